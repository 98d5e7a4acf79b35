"""URL downloads: resume, checksums, failures, timeouts, progress, names, concurrency.

Every test serves files from a FileServer on 127.0.0.1: no internet.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stipple_node.store import ChecksumMismatch, DownloadFailed, ModelStore, ProgressEvent, StoreError
from stipple_node.store.download import PART_NAME, ProgressReporter, file_name_from
from stipple_testkit.fileserver import FileServer, Served

BODY = os.urandom(300_000)
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as running:
        yield running


@pytest.fixture
def events() -> list[ProgressEvent]:
    return []


@pytest.fixture
def store(tmp_path: Path, events: list[ProgressEvent]) -> Iterator[ModelStore]:
    with ModelStore(
        tmp_path / "store", budget_bytes=None, progress=events.append, http_timeout_s=2, retries=0, backoff_s=0.01
    ) as opened:
        yield opened


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_full_download_uses_content_disposition_name(server: FileServer, store: ModelStore) -> None:
    url = server.add("/api/download/models/34562", Served(BODY, filename="dreamy-v2.safetensors"))
    path = store.resolve(url, kind="lora")
    assert path.name == "dreamy-v2.safetensors"
    assert path.read_bytes() == BODY
    assert not (path.parent / PART_NAME).exists()
    assert [r.range for r in server.requests("/api/download/models/34562")] == [None]
    # Resolving again is served from disk.
    assert store.resolve(url) == path
    assert len(server.requests("/api/download/models/34562")) == 1


def test_name_falls_back_to_url_path(server: FileServer, store: ModelStore) -> None:
    url = server.add("/files/my%20embedding.pt", Served(BODY))
    assert store.resolve(url).name == "my embedding.pt"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('attachment; filename="model.safetensors"', "model.safetensors"),
        ("attachment; filename*=UTF-8''m%C3%BCde%20v1.safetensors", "müde v1.safetensors"),
        ('attachment; filename="../../etc/passwd"', "passwd"),
        ('attachment; filename=".hidden"', "hidden"),
        ('attachment; filename=""', "34562"),
        (None, "34562"),
    ],
)
def test_file_name_from_headers(header: str | None, expected: str) -> None:
    url = "https://civitai.com/api/download/models/34562?token=x"
    headers = {"content-disposition": header} if header else {}
    response = httpx.Response(200, headers=headers, request=httpx.Request("GET", url))
    assert file_name_from(response, url) == expected


def test_sha256_ok(server: FileServer, store: ModelStore) -> None:
    url = server.add("/m.safetensors", Served(BODY))
    assert store.resolve(url, sha256=SHA.upper()).read_bytes() == BODY


def test_wrong_sha256_raises_and_leaves_no_file(server: FileServer, store: ModelStore) -> None:
    url = server.add("/m.safetensors", Served(BODY))
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatch) as info:
        store.resolve(url, sha256=wrong)
    assert info.value.code == "checksum_mismatch"
    assert wrong in info.value.message
    assert SHA in info.value.message
    assert files_in(store.root / "files") == []
    assert store.inventory() == []


def test_interrupted_download_resumes_with_range(server: FileServer, store: ModelStore) -> None:
    served = server.add("/big.safetensors", Served(BODY, drop_after=100_000))
    with pytest.raises(DownloadFailed) as info:
        store.resolve(served)
    assert info.value.retryable
    assert "big.safetensors" in info.value.message
    part = next((store.root / "files").rglob(PART_NAME))
    assert part.stat().st_size == 100_000

    path = store.resolve(served)
    assert path.read_bytes() == BODY
    first, second = server.requests("/big.safetensors")
    assert first.range is None
    assert second.range == "bytes=100000-"
    assert second.status == 206
    assert second.if_range == server.files["/big.safetensors"].etag
    assert store.inventory()[0].size_bytes == len(BODY)


def test_retries_resume_within_one_call(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/big.safetensors", Served(BODY, drop_after=50_000, drops=2))
    with ModelStore(tmp_path / "s", budget_bytes=None, retries=2, backoff_s=0.01) as store:
        assert store.resolve(url, sha256=SHA).read_bytes() == BODY
    assert [r.range for r in server.requests("/big.safetensors")] == [None, "bytes=50000-", "bytes=50000-"]


def test_server_ignoring_range_restarts_from_zero(server: FileServer, store: ModelStore) -> None:
    url = server.add("/big.safetensors", Served(BODY, drop_after=120_000))
    with pytest.raises(DownloadFailed):
        store.resolve(url)
    server.files["/big.safetensors"].ignore_range = True
    assert store.resolve(url, sha256=SHA).read_bytes() == BODY
    second = server.requests("/big.safetensors")[1]
    assert second.range == "bytes=120000-"
    assert second.status == 200


def test_file_changed_on_server_restarts_from_zero(server: FileServer, store: ModelStore) -> None:
    url = server.add("/big.safetensors", Served(BODY, drop_after=120_000))
    with pytest.raises(DownloadFailed):
        store.resolve(url)
    new_body = os.urandom(200_000)
    server.add("/big.safetensors", Served(new_body))  # new ETag: If-Range does not match
    assert store.resolve(url).read_bytes() == new_body
    assert server.requests("/big.safetensors")[1].status == 200


def test_complete_part_is_finished_after_416(server: FileServer, store: ModelStore) -> None:
    url = server.add("/big.safetensors", Served(BODY, drop_after=len(BODY) - 1))
    with pytest.raises(DownloadFailed):
        store.resolve(url)
    part = next((store.root / "files").rglob(PART_NAME))
    with open(part, "ab") as out:  # the last byte arrived after all (as if the drop came late)
        out.write(BODY[-1:])
    assert store.resolve(url, sha256=SHA).read_bytes() == BODY
    assert server.requests("/big.safetensors")[-1].status == 416


def test_http_500_is_retryable(server: FileServer, store: ModelStore) -> None:
    url = server.add("/m.safetensors", Served(BODY, status=500))
    with pytest.raises(DownloadFailed) as info:
        store.resolve(url)
    assert info.value.code == "download_failed"
    assert info.value.retryable
    assert isinstance(info.value, StoreError)
    assert url in info.value.message
    assert "HTTP 500" in info.value.message


@pytest.mark.parametrize("status", [404, 403])
def test_http_4xx_is_not_retryable(server: FileServer, tmp_path: Path, status: int) -> None:
    url = server.add("/m.safetensors", Served(BODY, status=status))
    with (
        ModelStore(tmp_path / "s", budget_bytes=None, retries=3, backoff_s=0.01) as store,
        pytest.raises(DownloadFailed) as info,
    ):
        store.resolve(url)
    assert not info.value.retryable
    assert info.value.status == status
    assert f"HTTP {status}" in info.value.message
    assert len(server.requests("/m.safetensors")) == 1  # not retried


def test_connection_refused_is_retryable(store: ModelStore) -> None:
    with socket_port() as port:
        pass  # the port is free again: nothing listens there
    with pytest.raises(DownloadFailed) as info:
        store.resolve(f"http://127.0.0.1:{port}/m.safetensors")
    assert info.value.retryable
    assert "ConnectError" in info.value.message


@pytest.mark.parametrize(
    "served",
    [Served(BODY, stall_before_s=3), Served(BODY, stall_after=65_536, stall_s=3)],
    ids=["before-headers", "mid-body"],
)
def test_hanging_server_times_out(server: FileServer, tmp_path: Path, served: Served) -> None:
    url = server.add("/slow.safetensors", served)
    with ModelStore(tmp_path / "s", budget_bytes=None, http_timeout_s=0.3, retries=0) as store:
        started = time.monotonic()
        with pytest.raises(DownloadFailed) as info:
            store.resolve(url)
        elapsed = time.monotonic() - started
    assert elapsed < 1.5
    assert info.value.retryable
    assert "timed out after 0.3 s" in info.value.message


def test_progress_is_monotonic_throttled_and_ends_done(
    server: FileServer, store: ModelStore, events: list[ProgressEvent]
) -> None:
    body = os.urandom(1 << 20)
    url = server.add("/m.safetensors", Served(body, chunk_bytes=64 * 1024, chunk_delay_s=0.07))  # ~1.1 s
    store.resolve(url)
    sizes = [e.downloaded_bytes for e in events]
    assert sizes == sorted(sizes)
    assert 2 <= len(events) <= 5  # ~every 0.5 s plus the last, not one per chunk
    assert events[-1] == ProgressEvent(ref=url, downloaded_bytes=len(body), total_bytes=len(body), done=True)
    assert not any(e.done for e in events[:-1])
    assert all(e.total_bytes == len(body) for e in events)


def test_progress_never_goes_back_after_restart(events: list[ProgressEvent]) -> None:
    reporter = ProgressReporter("r", events.append, interval_s=0, bar=False)
    for n in (0, 100, 200, 0, 50, 150, 250):  # a restart from 0 after 200
        reporter.update(n, 300)
    reporter.finish(300, 300)
    assert [e.downloaded_bytes for e in events] == [0, 100, 200, 250, 300]


def test_broken_progress_callback_does_not_break_download(server: FileServer, tmp_path: Path) -> None:
    def explode(event: ProgressEvent) -> None:
        raise RuntimeError("sink down")

    url = server.add("/m.safetensors", Served(BODY))
    with ModelStore(tmp_path / "s", budget_bytes=None, progress=explode) as store:
        assert store.resolve(url).read_bytes() == BODY


def test_concurrent_resolve_downloads_once(server: FileServer, store: ModelStore) -> None:
    url = server.add("/m.safetensors", Served(BODY, chunk_bytes=32 * 1024, chunk_delay_s=0.02))
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(store.resolve(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not errors
    assert len(results) == 2
    assert results[0] == results[1]
    assert results[0].read_bytes() == BODY
    assert len(server.requests("/m.safetensors")) == 1


def test_secrets_in_url_are_never_shown(server: FileServer, store: ModelStore, events: list[ProgressEvent]) -> None:
    url = server.add("/api/download/models/1?type=Model&token=s3cr3t", Served(BODY, filename="m.safetensors"))
    store.resolve(url)
    assert all("s3cr3t" not in e.ref for e in events)
    assert [m.ref for m in store.inventory()] == [server.url("/api/download/models/1?type=Model")]
    assert "s3cr3t" not in (store.root / "index.json").read_text()
    server.files["/api/download/models/1"].status = 500
    other = url.replace("/1?", "/1?x=2&")
    with pytest.raises(DownloadFailed) as info:
        store.resolve(other)
    assert "s3cr3t" not in info.value.message


class socket_port:
    """A free TCP port on 127.0.0.1 (bound while inside the block)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

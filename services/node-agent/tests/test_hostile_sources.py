"""Hostile model sources: what an app names as a URL cannot reach the node operator's network,
fill its disk, or hold the node.

Files come from a FileServer on 127.0.0.1 (the only host the tests' policies let resolve to
a loopback address); other host names resolve through a stub resolver, and every TCP connect
is recorded, so that a refused address is shown never to be connected to.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpcore
import httpx
import pytest

from stipple_common.sources import SourcePolicy
from stipple_common.taskspec import parse_task
from stipple_node.pipeline import PipelineRunner
from stipple_node.store import (
    DiskBudgetExceeded,
    DownloadCancelled,
    DownloadFailed,
    DownloadTooLarge,
    DownloadTooSlow,
    ModelStore,
    ProgressEvent,
    SourceRefused,
)
from stipple_node.store.download import PART_NAME, download
from stipple_testkit.fileserver import FileServer, Served

BODY = os.urandom(200_000)
SHA = hashlib.sha256(BODY).hexdigest()
LOOPBACK = SourcePolicy(
    hosts=["127.0.0.1", "internal.test", "mirror.test"],
    http_hosts=["127.0.0.1", "internal.test", "mirror.test"],
    private_hosts=["127.0.0.1"],
    require_sha256=False,
)
ANSWERS = {"internal.test": ["10.0.0.9"], "mirror.test": ["93.184.216.34", "169.254.169.254"]}


def stub_resolver(host: str, port: int, timeout_s: float | None) -> list[str]:
    if host not in ANSWERS:
        raise OSError(f"stub resolver: unknown host {host}")
    return ANSWERS[host]


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as running:
        yield running


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every address a TCP connection is opened to."""
    seen: list[str] = []
    real = httpcore.SyncBackend.connect_tcp

    def recording(self: httpcore.SyncBackend, host: str, port: int, *args: object, **kwargs: object) -> object:
        seen.append(host)
        return real(self, host, port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", recording)
    return seen


def open_store(path: Path, policy: SourcePolicy = LOOPBACK, **options: object) -> ModelStore:
    options = {"budget_bytes": None, "retries": 0, "backoff_s": 0.01, "http_timeout_s": 5, **options}
    return ModelStore(path, sources=policy, resolver=stub_resolver, **options)  # type: ignore[arg-type]


# -- the policy, on the node ---------------------------------------------------------------


def test_the_node_checks_the_policy_before_any_request(server: FileServer, tmp_path: Path, connects: list[str]) -> None:
    url = server.add("/a.safetensors", Served(BODY))
    strict = SourcePolicy(hosts=["127.0.0.1"], private_hosts=["127.0.0.1"])  # https only, sha256 required
    with open_store(tmp_path / "s", strict) as store:
        with pytest.raises(SourceRefused) as caught:
            store.resolve(url + f"#sha256={SHA}")
        assert "plain http to '127.0.0.1'" in caught.value.message
        with pytest.raises(SourceRefused, match="must carry the file's sha256"):
            store.resolve(url.replace("http:", "https:"))
    with open_store(tmp_path / "t", SourcePolicy(hf=False)) as store, pytest.raises(SourceRefused) as caught:
        store.resolve("stabilityai/sdxl-vae", kind="model")
    assert "does not fetch Hugging Face repos" in caught.value.message
    assert caught.value.code == "source_refused"
    assert not caught.value.retryable
    assert server.requests("/a.safetensors") == []
    assert connects == []


def test_a_host_that_resolves_to_a_private_address_is_never_connected_to(tmp_path: Path, connects: list[str]) -> None:
    with open_store(tmp_path / "s") as store:
        with pytest.raises(SourceRefused) as caught:
            store.resolve("http://internal.test/x.safetensors")
        assert "refused address 10.0.0.9: private" in caught.value.message
        with pytest.raises(SourceRefused, match="refused address 169.254.169.254: link-local"):
            store.resolve("http://mirror.test/x.safetensors")  # one public address is not enough
    assert connects == []


def test_a_redirect_to_a_private_address_is_refused_before_connecting(
    server: FileServer, tmp_path: Path, connects: list[str]
) -> None:
    url = server.add("/r", Served(b"", redirect_to="http://internal.test:9/secret"))
    with open_store(tmp_path / "s") as store, pytest.raises(SourceRefused) as caught:
        store.resolve(url, kind="lora")
    assert "refused address 10.0.0.9" in caught.value.message
    assert connects == ["127.0.0.1"]


def test_a_redirect_is_checked_against_the_policy(server: FileServer, tmp_path: Path, connects: list[str]) -> None:
    elsewhere = server.add("/elsewhere", Served(b"", redirect_to="https://evil.example.net/x"))
    metadata = server.add("/meta", Served(b"", redirect_to="http://169.254.169.254/latest/meta-data/"))
    with open_store(tmp_path / "s") as store:
        with pytest.raises(SourceRefused, match="redirect to https://evil.example.net/x: not allowed by policy"):
            store.resolve(elsewhere)
        with pytest.raises(SourceRefused, match="host '169.254.169.254' is not among the allowed"):
            store.resolve(metadata)
    assert connects == ["127.0.0.1", "127.0.0.1"]


def test_redirects_are_followed_at_most_five_times(server: FileServer, tmp_path: Path) -> None:
    server.add("/final.safetensors", Served(BODY))
    for hop in range(5):
        server.add(f"/hop{hop}", Served(b"", redirect_to=f"/hop{hop + 1}" if hop < 4 else "/final.safetensors"))
    loop = server.add("/loop", Served(b"", redirect_to="/loop"))
    with open_store(tmp_path / "s") as store:
        path = store.resolve(server.url("/hop0") + f"#sha256={SHA}")
        assert path.read_bytes() == BODY
        with pytest.raises(DownloadFailed, match="more than 5 redirects"):
            store.resolve(loop)
    assert len(server.requests("/loop")) == 6


# -- size limits while streaming -----------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "no-length"])
def test_a_body_without_a_length_is_cut_at_the_limit_while_it_streams(
    server: FileServer, tmp_path: Path, chunked: bool
) -> None:
    limit = 64 * 1024
    url = server.add("/big", Served(os.urandom(2_000_000), chunked=chunked, send_length=False, chunk_bytes=8192))
    held: list[int] = []
    with pytest.raises(DownloadTooLarge) as caught:
        download(url, tmp_path / "d", sources=LOOPBACK, max_bytes=limit, retries=0, hold=held.append, timeout_s=5)
    assert "passed the limit of 65536 bytes while downloading" in caught.value.message
    assert caught.value.code == "download_too_large"
    assert held  # the budget was asked as it grew...
    assert max(held) <= limit  # ...and no more than the limit was ever written
    assert not (tmp_path / "d" / PART_NAME).exists()


def test_a_chunked_body_within_the_limits_is_stored(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/c", Served(BODY, chunked=True, filename="c.safetensors"))
    with open_store(tmp_path / "s", max_download_bytes=len(BODY)) as store:
        assert store.resolve(url).read_bytes() == BODY


def test_an_announced_length_above_the_limit_is_refused_before_reading(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/big", Served(BODY))
    with open_store(tmp_path / "s", max_download_bytes=1000) as store, pytest.raises(DownloadTooLarge) as caught:
        store.resolve(url)
    assert "announces 200000 bytes; the limit is 1000" in caught.value.message
    assert not list((tmp_path / "s" / "files").rglob("*.part"))


def test_a_chunked_body_is_checked_against_the_disk_budget_while_it_streams(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/big", Served(os.urandom(2_000_000), chunked=True, chunk_bytes=8192))
    with open_store(tmp_path / "s", budget_bytes=50_000) as store:
        with pytest.raises(DiskBudgetExceeded) as caught:
            store.resolve(url)
        assert caught.value.needed <= 50_000 + 8192  # refused when it passed the budget, not at the end
        assert store.used_bytes == 0
    assert not list((tmp_path / "s" / "files").rglob("*.part"))


def test_a_compressed_body_is_refused(server: FileServer, tmp_path: Path) -> None:
    bomb = gzip.compress(bytes(5_000_000))  # 5 MB of zeros in a few KB
    url = server.add("/bomb", Served(bomb, content_encoding="gzip", chunked=True))
    with open_store(tmp_path / "s", max_download_bytes=1_000_000, retries=2) as store:
        with pytest.raises(DownloadFailed) as caught:
            store.resolve(url)
        assert "Content-Encoding 'gzip'; nodes accept only identity" in caught.value.message
        assert not caught.value.retryable
    assert len(server.requests("/bomb")) == 1


# -- time limit and cancellation -----------------------------------------------------------


def test_a_trickling_server_is_cut_at_the_total_time_limit(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/slow", Served(BODY, chunk_bytes=1000, chunk_delay_s=0.05))  # 10 s in all
    with open_store(tmp_path / "s", download_timeout_s=1, retries=3) as store, pytest.raises(DownloadTooSlow) as caught:
        store.resolve(url)
    assert "too slow: not finished within 1 s" in caught.value.message
    assert caught.value.code == "download_too_slow"
    assert len(server.requests("/slow")) == 1  # not retried


def test_a_silent_server_is_cut_at_the_total_time_limit(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/stall", Served(BODY, stall_after=65536, stall_s=30))
    with open_store(tmp_path / "s", download_timeout_s=1, http_timeout_s=30) as store, pytest.raises(DownloadTooSlow):
        store.resolve(url)


def test_a_download_stops_when_cancelled_and_keeps_its_part(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/slow", Served(BODY, chunk_bytes=1000, chunk_delay_s=0.05))
    stop = threading.Event()

    def progress(event: ProgressEvent) -> None:
        if event.downloaded_bytes > 0:
            stop.set()

    with open_store(tmp_path / "s", progress=progress) as store, pytest.raises(DownloadCancelled) as caught:
        store.resolve(url, cancelled=stop.is_set)
    assert caught.value.code == "download_cancelled"
    parts = list((tmp_path / "s" / "files").rglob(PART_NAME))
    assert len(parts) == 1
    assert 0 < parts[0].stat().st_size < len(BODY)  # resumable later


def test_a_cancel_cuts_a_read_that_waits_on_a_silent_server(server: FileServer, tmp_path: Path) -> None:
    url = server.add("/stall", Served(BODY, send_length=False, stall_after=65536, stall_s=30))
    seen_at: list[float] = []

    with open_store(tmp_path / "s", http_timeout_s=30) as store:

        def cancelled() -> bool:  # true a moment after the first 64 KiB, while the server is silent
            if store.used_bytes < 65536:
                return False
            seen_at.append(time.monotonic())
            return time.monotonic() - seen_at[0] > 0.3

        with pytest.raises(DownloadCancelled) as caught:
            store.resolve(url, cancelled=cancelled)
    # The watchdog shut the socket down: the read failed at once, not by its 30 s timeout.
    assert not isinstance(caught.value.__context__, httpx.TimeoutException)
    assert caught.value.cause == "cancelled"


# -- the pipeline lock ---------------------------------------------------------------------


@pytest.mark.timeout(120)  # builds the tiny model's pipeline once the download is cancelled (CPU)
def test_the_pipeline_lock_is_free_while_a_task_downloads(
    server: FileServer, tmp_path: Path, tiny_model_dir: Path
) -> None:
    url = server.add("/lora.safetensors", Served(BODY, chunk_bytes=1000, chunk_delay_s=0.05))
    downloading, cancel = threading.Event(), threading.Event()

    def progress(event: ProgressEvent) -> None:
        if event.downloaded_bytes > 0:
            downloading.set()

    spec = parse_task(
        {"base_model": "tiny-sd", "prompt": "a cat", "loras": [{"model": url}], "task_config": {"seed": 1, "steps": 1}}
    )
    outcome: list[BaseException] = []
    with open_store(tmp_path / "s", progress=progress) as store:
        runner = PipelineRunner({"tiny-sd": tiny_model_dir}, store=store)

        def run() -> None:
            try:
                runner.run(spec, cancelled=cancel.is_set)
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        assert downloading.wait(30)
        assert runner._lock.acquire(blocking=False)  # another task could load and run now
        runner._lock.release()
        cancel.set()
        worker.join(30)
    assert len(outcome) == 1
    assert isinstance(outcome[0], DownloadCancelled)
    assert outcome[0].message.startswith("loras[0].model: download of")

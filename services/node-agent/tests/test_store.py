"""The model store: reference kinds, local paths, LRU eviction within a budget, pins,
the index across restarts, inventory, and Hugging Face repos (offline, and online with a
stand-in for the hub)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stipple_common.errors import InvalidInput
from stipple_node.store import (
    ChecksumMismatch,
    DiskBudgetExceeded,
    ModelNotAvailable,
    ModelStore,
    StoreError,
    StoreLocked,
    classify,
)
from stipple_node.store.hf import offline_patterns, select_files, variant_of
from stipple_testkit.fileserver import FileServer, Served

KB = 1000


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as running:
        yield running


def serve(server: FileServer, name: str, size: int = KB) -> str:
    return server.add(f"/{name}", Served(os.urandom(size), filename=f"{name}.safetensors"))


# -- classify --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "kind"),
    [
        ("runwayml/stable-diffusion-v1-5", "hf"),
        ("stabilityai/sdxl-turbo", "hf"),
        ("gpt2", "hf"),
        ("/srv/models/sd15", "local_dir"),
        ("~/models/sd15", "local_dir"),
        ("file:///srv/models/sd15", "local_dir"),
        ("/srv/loras/style.safetensors", "local_file"),
        ("/srv/emb/bad-hands.pt", "local_file"),
        ("/srv/ckpt/v1-5-pruned.CKPT", "local_file"),
        ("file:///srv/loras/a%20b.bin", "local_file"),
        ("https://civitai.com/api/download/models/34562", "url"),
        ("http://127.0.0.1:8080/x.safetensors?token=abc", "url"),
    ],
)
def test_classify(ref: str, kind: str) -> None:
    assert classify(ref) == kind


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "   ",
        "../x",
        "./models/x",
        "models/../x",
        "/srv/../etc/models",
        "file:///srv/../x.safetensors",
        "ftp://example.com/model.safetensors",
        "s3://bucket/model",
        "https:///no-host",
        "file://otherhost/x",
        "a/b/c",
        "org--name/x",
        " runwayml/stable-diffusion-v1-5",
        "runwayml/sd\n",
    ],
)
def test_classify_rejects_garbage(ref: str) -> None:
    with pytest.raises(InvalidInput) as info:
        classify(ref)
    assert info.value.value == ref
    assert info.value.field == "model"
    assert repr(ref) in info.value.message


def test_resolve_rejects_bad_arguments(tmp_path: Path) -> None:
    with ModelStore(tmp_path / "s", budget_bytes=None) as store:
        with pytest.raises(InvalidInput, match="variant"):
            store.resolve("org/name", variant="fp16/../x")
        with pytest.raises(InvalidInput, match="sha256"):
            store.resolve("http://127.0.0.1:1/x.bin", sha256="abc")
        with pytest.raises(InvalidInput, match="kind"):
            store.resolve("org/name", kind="Model X")
        with pytest.raises(InvalidInput, match="sha256"):
            store.resolve("org/name", sha256="0" * 64)


# -- local paths -----------------------------------------------------------------------


def test_local_folder_and_file_are_returned_as_is_and_not_counted(tmp_path: Path) -> None:
    folder = tmp_path / "sd15"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"x" * 5000)
    with ModelStore(tmp_path / "s", budget_bytes=100) as store:
        assert store.resolve(str(folder)) == folder
        assert store.resolve(f"file://{folder}") == folder
        assert store.resolve(str(lora), kind="lora") == lora
        with store.use(str(lora)) as path:
            assert path == lora
        assert store.inventory() == []
        assert store.used_bytes == 0
        assert not store.pin(lora)
    assert lora.read_bytes() == b"x" * 5000


def test_local_paths_that_do_not_exist(tmp_path: Path) -> None:
    with ModelStore(tmp_path / "s", budget_bytes=None) as store:
        with pytest.raises(ModelNotAvailable, match="no folder at"):
            store.resolve(str(tmp_path / "missing"))
        with pytest.raises(ModelNotAvailable, match="no file at"):
            store.resolve(str(tmp_path / "missing.safetensors"))


def test_local_file_checksum_is_checked_but_file_kept(tmp_path: Path) -> None:
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"weights")
    import hashlib

    with ModelStore(tmp_path / "s", budget_bytes=None) as store:
        assert store.resolve(str(lora), sha256=hashlib.sha256(b"weights").hexdigest()) == lora
        with pytest.raises(ChecksumMismatch):
            store.resolve(str(lora), sha256="1" * 64)
    assert lora.exists()


# -- budget and eviction ---------------------------------------------------------------


def test_eviction_is_least_recently_used(server: FileServer, tmp_path: Path) -> None:
    a, b, c, d = (serve(server, name) for name in "abcd")
    with ModelStore(tmp_path / "s", budget_bytes=3 * KB) as store:
        paths = {url: store.resolve(url) for url in (a, b, c)}
        store.resolve(a)  # a is now the most recent; b the least
        store.resolve(d)
        assert {m.ref for m in store.inventory()} == {a, c, d}
        assert not paths[b].exists()
        assert paths[a].exists()
        store.resolve(b)  # c is now the least recent
        assert {m.ref for m in store.inventory()} == {a, b, d}
        assert store.used_bytes == 3 * KB


def test_pinned_entry_is_not_evicted(server: FileServer, tmp_path: Path) -> None:
    a, b, c = (serve(server, name) for name in "abc")
    with ModelStore(tmp_path / "s", budget_bytes=2 * KB) as store:
        with store.use(a) as path_a:
            store.resolve(b)
            store.resolve(c)  # a is the LRU entry but pinned: b goes
            assert path_a.exists()
            assert {m.ref for m in store.inventory()} == {a, c}
        store.resolve(b)  # unpinned now: a is the LRU entry and goes
        assert {m.ref for m in store.inventory()} == {b, c}


def test_using_pins_a_resolved_path(server: FileServer, tmp_path: Path) -> None:
    a, b = serve(server, "a"), serve(server, "b")
    with ModelStore(tmp_path / "s", budget_bytes=1 * KB) as store:
        path = store.resolve(a)
        with store.using(path), pytest.raises(DiskBudgetExceeded):
            store.resolve(b)
        assert store.resolve(b).exists()
        assert not path.exists()


def test_impossible_fit_raises_and_evicts_nothing(server: FileServer, tmp_path: Path) -> None:
    a, b = serve(server, "a"), serve(server, "b")
    big = serve(server, "big", 5 * KB)
    with ModelStore(tmp_path / "s", budget_bytes=3 * KB) as store:
        store.resolve(a)
        with store.use(b):
            with pytest.raises(DiskBudgetExceeded) as info:
                store.resolve(big)
            error = info.value
            assert isinstance(error, StoreError)
            assert error.code == "disk_budget_exceeded"
            assert (error.needed, error.budget, error.unevictable) == (5 * KB, 3 * KB, 1 * KB)
            assert "5000 B" in error.message
            assert "3000 B" in error.message
            assert big in error.message
            assert {m.ref for m in store.inventory()} == {a, b}  # nothing evicted in vain
            with pytest.raises(DiskBudgetExceeded):  # 2 KB fits only if b, pinned, went
                store.resolve(serve(server, "c", 2500))
        assert not list((store.root / "files").rglob(".download.part"))


def test_unknown_size_is_checked_when_done(server: FileServer, tmp_path: Path) -> None:
    a = serve(server, "a")
    chunked = server.add("/chunked", Served(os.urandom(2 * KB), send_length=False, filename="c.safetensors"))
    too_big = server.add("/huge", Served(os.urandom(4 * KB), send_length=False, filename="h.safetensors"))
    with ModelStore(tmp_path / "s", budget_bytes=3 * KB) as store:
        store.resolve(a)
        store.resolve(chunked)
        with pytest.raises(DiskBudgetExceeded):
            store.resolve(too_big)
        assert {m.ref for m in store.inventory()} == {a, chunked}
        assert not list((store.root / "files").rglob("h.safetensors"))


def test_new_checksum_replaces_a_stored_file(server: FileServer, tmp_path: Path) -> None:
    import hashlib

    url = server.add("/m", Served(b"old", filename="m.safetensors"))
    with ModelStore(tmp_path / "s", budget_bytes=None) as store:
        store.resolve(url)
        server.add("/m", Served(b"new", filename="m.safetensors"))
        path = store.resolve(url, sha256=hashlib.sha256(b"new").hexdigest())
        assert path.read_bytes() == b"new"
        assert len(server.requests("/m")) == 2


# -- index and inventory ---------------------------------------------------------------


def test_index_survives_a_new_store_and_inventory_lists_entries(server: FileServer, tmp_path: Path) -> None:
    a, b = serve(server, "a", 1500), serve(server, "b", 2500)
    root = tmp_path / "s"
    with ModelStore(root, budget_bytes=10 * KB) as store:
        path_a = store.resolve(a, kind="lora")
        store.resolve(b)
        before = store.inventory()
    with ModelStore(root, budget_bytes=10 * KB) as again:
        after = again.inventory()
        assert after == before
        assert {(m.ref, m.size_bytes, m.kind, m.source) for m in after} == {
            (a, 1500, "lora", "url"),
            (b, 2500, "model", "url"),
        }
        assert again.resolve(a) == path_a
        assert len(server.requests("/a")) == 1  # not downloaded again
        assert again.used_bytes == 4000


def test_index_forgets_files_deleted_behind_its_back(server: FileServer, tmp_path: Path) -> None:
    a = serve(server, "a")
    root = tmp_path / "s"
    with ModelStore(root, budget_bytes=None) as store:
        store.resolve(a).unlink()
    with ModelStore(root, budget_bytes=None) as store:
        assert store.inventory() == []
        assert store.resolve(a).exists()


def test_corrupt_index_is_set_aside(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir()
    (root / "index.json").write_text("{not json")
    with ModelStore(root, budget_bytes=None) as store:
        assert store.inventory() == []
    assert list(root.glob("index.json.corrupt-*"))


def test_a_root_has_one_owner(tmp_path: Path) -> None:
    with ModelStore(tmp_path / "s", budget_bytes=None) as store:
        with pytest.raises(StoreLocked) as info:
            ModelStore(tmp_path / "s", budget_bytes=None)
        assert info.value.code == "store_locked"
    with pytest.raises(StoreError, match="closed"):
        store.resolve("org/x")
    ModelStore(tmp_path / "s", budget_bytes=None).close()  # free again once closed


# -- Hugging Face ----------------------------------------------------------------------


def test_hf_repo_not_cached_offline_fails_fast(tmp_path: Path) -> None:
    with ModelStore(tmp_path / "s", budget_bytes=None, hf_offline=True) as store:
        started = time.monotonic()
        with pytest.raises(ModelNotAvailable) as info:
            store.resolve("runwayml/stable-diffusion-v1-5", variant="fp16")
        assert time.monotonic() - started < 2
    assert info.value.code == "model_not_available"
    assert not info.value.retryable
    assert "runwayml/stable-diffusion-v1-5" in info.value.message
    assert "offline" in info.value.message


def fake_hf_cache(root: Path, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """A repo laid out as huggingface_hub caches it (blobs, symlinked snapshot, refs/main)."""
    repo = root / "hf" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / f"{abs(hash(name))}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hf_repo_cached_offline_resolves_and_is_kept(server: FileServer, tmp_path: Path) -> None:
    root = tmp_path / "s"
    snapshot = fake_hf_cache(
        root,
        "org/tiny-sd",
        {"model_index.json": b"{}", "unet/config.json": b"{}", "unet/diffusion_pytorch_model.safetensors": b"w" * KB},
    )
    with ModelStore(root, budget_bytes=2 * KB, hf_offline=True) as store:
        assert store.resolve("org/tiny-sd") == snapshot
        [stored] = store.inventory()
        assert (stored.ref, stored.source, stored.size_bytes) == (
            "org/tiny-sd",
            "hf",
            KB + 4 + 40,
        )  # blobs and refs/main
        # The repo cannot be fetched again while offline, so it is not evicted for a download.
        a = store.resolve(serve(server, "a", 900))
        with pytest.raises(DiskBudgetExceeded) as info:
            store.resolve(serve(server, "b", 1000))
        assert info.value.unevictable == KB + 44
        assert snapshot.exists()
        assert a.exists()


def test_hf_cached_snapshot_without_model_index(tmp_path: Path) -> None:
    root = tmp_path / "s"
    fake_hf_cache(root, "org/lora", {"pytorch_lora_weights.safetensors": b"w"})
    with ModelStore(root, budget_bytes=None) as store:
        assert store.resolve("org/lora", kind="lora").name == "a" * 40
        with pytest.raises(ModelNotAvailable, match="model_index.json"):
            store.resolve("org/lora")


SD_REPO = [
    "model_index.json",
    "v1-5-pruned.safetensors",
    "v1-5-pruned.ckpt",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "safety_checker/config.json",
    "safety_checker/pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
    "vae/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]


def test_variant_of() -> None:
    assert variant_of("unet/diffusion_pytorch_model.fp16.safetensors") == "fp16"
    assert variant_of("vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors") == "fp16"
    assert variant_of("unet/diffusion_pytorch_model-00001-of-00002.safetensors") is None
    assert variant_of("text_encoder/pytorch_model.bin") is None


def test_select_files_for_a_diffusers_repo() -> None:
    meta = {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "unet/config.json",
        "safety_checker/config.json",
        "vae/config.json",
    }
    plain = set(select_files(SD_REPO, "model", None))
    assert plain - meta == {
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "safety_checker/pytorch_model.bin",  # no safetensors there: the .bin
        "vae/diffusion_pytorch_model.safetensors",
    }
    fp16 = set(select_files(SD_REPO, "model", "fp16"))
    assert fp16 - meta == {
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "safety_checker/pytorch_model.bin",  # no fp16 there: the plain weights
        "vae/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
    }
    with pytest.raises(InvalidInput, match="bf16"):
        select_files(SD_REPO, "model", "bf16", repo_id="org/sd")
    assert select_files(["README.md", "lora.safetensors", "x.bin"], "lora", None) == ["lora.safetensors"]


def test_offline_patterns_pick_the_same_files_as_select_files() -> None:
    from huggingface_hub.utils import filter_repo_objects

    for variant in (None, "fp16"):
        allow, ignore = offline_patterns("model", variant)
        by_patterns = set(filter_repo_objects(SD_REPO, allow_patterns=allow, ignore_patterns=ignore))
        selected = set(select_files(SD_REPO, "model", variant))
        # The patterns cannot express the .bin fallback (safety_checker); all else agrees.
        assert by_patterns == selected - {"safety_checker/pytorch_model.bin"}


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download while online: files of given sizes."""

    def __init__(self, repo_files: dict[str, int]) -> None:
        self.repo_files = repo_files
        self.calls: list[dict[str, Any]] = []

    def __call__(self, repo_id: str, *, cache_dir: Path, dry_run: bool = False, **kwargs: Any) -> Any:
        from huggingface_hub.file_download import DryRunFileInfo

        self.calls.append({"dry_run": dry_run, **kwargs})
        repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / ("b" * 40)
        if dry_run:
            return [
                DryRunFileInfo(
                    commit_hash="b" * 40,
                    file_size=size,
                    filename=name,
                    local_path=str(snapshot / name),
                    is_cached=(snapshot / name).exists(),
                    will_download=not (snapshot / name).exists(),
                )
                for name, size in self.repo_files.items()
            ]
        for name in kwargs["allow_patterns"]:
            target = snapshot / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"x" * self.repo_files[name])
        return str(snapshot)


def test_hf_online_fetches_only_needed_files_within_budget(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    hub = FakeHub(
        {
            "model_index.json": 10,
            "unet/config.json": 10,
            "unet/diffusion_pytorch_model.safetensors": 2000,
            "unet/diffusion_pytorch_model.fp16.safetensors": 1000,
            "v1-5-pruned.safetensors": 9000,
        }
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with ModelStore(tmp_path / "s", budget_bytes=2 * KB, hf_offline=False) as store:
        old = store.resolve(serve(server, "old", 1500))
        path = store.resolve("org/sd", variant="fp16")
        assert sorted(hub.calls[-1]["allow_patterns"]) == [
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
        ]
        assert (path / "model_index.json").exists()
        assert not old.exists()  # evicted to make room for 1020 bytes
        assert [(m.ref, m.size_bytes) for m in store.inventory()] == [("org/sd", 1020)]
        with pytest.raises(DiskBudgetExceeded):  # the plain weights would need 3020 bytes in all
            store.resolve("org/sd")
        assert store.resolve("org/sd", variant="fp16") == path


def test_hf_online_errors_are_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/x"))
    cases: list[tuple[Exception, type[StoreError], bool]] = [
        (RepositoryNotFoundError("404 Client Error", response=response), ModelNotAvailable, False),
        (LocalEntryNotFoundError("hub unreachable"), StoreError, True),
    ]
    with ModelStore(tmp_path / "s", budget_bytes=None, hf_offline=False) as store:
        for raised, expected, retryable in cases:

            def fail(*args: Any, exc: Exception = raised, **kwargs: Any) -> Any:
                raise exc

            monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
            with pytest.raises(expected) as info:
                store.resolve("org/x")
            assert info.value.retryable is retryable
            assert "org/x" in info.value.message

"""Hugging Face repos: which files of a diffusers repo a node needs, and fetching them.

A diffusers repo holds much more than one node needs: weights in several precisions
(``*.fp16.safetensors`` next to ``*.safetensors``), pickled ``.bin`` copies, and often a
multi-GB single-file checkpoint at the top. Downloading all of it would blow the disk
budget, so the store picks, per component folder, the requested variant (else the plain
weights), safetensors over ``.bin``, and never top-level checkpoints.
"""

from __future__ import annotations

import posixpath
import re
from collections import defaultdict
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path

from stipple_common.errors import InvalidInput

META_PATTERNS: tuple[str, ...] = ("*.json", "*.txt", "*.model")
"""Configs, tokenizer vocabularies and merges, sentencepiece models."""

_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


def variant_of(filename: str) -> str | None:
    """The variant in a weight file name: "fp16" for "unet/x.fp16.safetensors" and for the
    shard "x.fp16-00001-of-00002.safetensors"; None for "x.safetensors"."""
    stem = posixpath.basename(filename).rsplit(".", 1)[0]
    stem = _SHARD.sub("", stem)
    return stem.rsplit(".", 1)[1] if "." in stem else None


def offline_patterns(kind: str, variant: str | None) -> tuple[list[str], list[str] | None]:
    """(allow, ignore) patterns for a repo the store has not fetched itself (no file list known).

    They name the same files `select_files` would pick for an ordinary diffusers repo.
    """
    if kind != "model":
        return ["*.safetensors", "*.json"], None
    if variant:
        return [*META_PATTERNS, f"*/*.{variant}.safetensors", f"*/*.{variant}-*.safetensors"], None
    return [*META_PATTERNS, "*/*.safetensors"], ["*/*.*.safetensors"]


def select_files(files: Iterable[str], kind: str, variant: str | None, *, repo_id: str = "") -> list[str]:
    """The files of a repo listing that a node needs for `kind` ("model": a diffusers folder).

    Raise InvalidInput naming the variant when a variant is asked for and no weight file of
    the repo has it.
    """
    files = sorted(files)
    if kind != "model":
        return [f for f in files if f.endswith((".safetensors", ".json"))]
    chosen = [f for f in files if any(fnmatch(f, pattern) for pattern in META_PATTERNS)]
    weights: dict[str, list[str]] = defaultdict(list)
    for f in files:
        folder = posixpath.dirname(f)
        if folder and f.endswith((".safetensors", ".bin")):
            weights[folder].append(f)
    found_variant = False
    for folder_files in weights.values():
        picked, is_variant = _pick_weights(folder_files, variant)
        chosen.extend(picked)
        found_variant |= is_variant
    if variant and weights and not found_variant:
        raise InvalidInput("variant", variant, f"repo {repo_id or '?'} has no weight files of this variant")
    return sorted(chosen)


def _pick_weights(files: list[str], variant: str | None) -> tuple[list[str], bool]:
    """Weights of one component: the variant if asked and present, else plain; safetensors first."""
    for suffix in (".safetensors", ".bin"):
        candidates = [f for f in files if f.endswith(suffix)]
        if variant:
            picked = [f for f in candidates if variant_of(f) == variant]
            if picked:
                return picked, True
        picked = [f for f in candidates if variant_of(f) is None]
        if picked:
            return picked, False
    return [], False


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    """Where huggingface_hub caches a model repo: ``models--namespace--name``."""
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder` (symlinks not followed, so HF blobs count once)."""
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:
            continue
    return total

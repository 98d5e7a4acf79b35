"""What kind of thing a model reference names, decided from the string alone.

Pure functions, no file system or network: the gateway can use `classify` to refuse a
bad reference before any node sees it, and the store uses it to pick a resolver.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from stipple_common.errors import InvalidInput

RefKind = Literal["hf", "local_dir", "local_file", "url"]

WEIGHT_SUFFIXES: frozenset[str] = frozenset({".safetensors", ".ckpt", ".pt", ".pth", ".bin"})
"""A local path ending in one of these is a single-file checkpoint, LoRA or embedding."""

MAX_REF_CHARS = 2048

# Query parameters that carry credentials (Civitai's `token`, S3 presigned URLs, ...). They
# are cut from the URL before it is logged, shown in an error, announced or used as a key.
SECRET_PARAMS: frozenset[str] = frozenset(
    {"token", "api_key", "apikey", "key", "access_token", "auth", "sig", "signature", "password"}
)
SECRET_PREFIXES: tuple[str, ...] = ("x-amz-", "x-goog-")

# Hugging Face's own rule (huggingface_hub.utils.validate_repo_id): "name" or "namespace/name".
_HF_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]{0,95}/)?[A-Za-z0-9][\w.\-]{0,95}$")
_VARIANT = re.compile(r"^[A-Za-z0-9_]{1,32}$")


def classify(ref: str, *, field: str = "model") -> RefKind:
    """Say whether `ref` is a Hugging Face repo id, a local folder, a local file or a URL.

    Raise InvalidInput naming `field` and the value for anything else: empty strings,
    relative paths ("../x", "models/x" is a repo id only if it is a valid one), ".."
    segments, schemes other than http(s) and file.
    """
    if not isinstance(ref, str):
        raise InvalidInput(field, ref, "must be a string")
    if not ref.strip():
        raise InvalidInput(field, ref, "must not be empty")
    if ref != ref.strip() or any(ord(c) < 32 for c in ref):
        raise InvalidInput(field, ref, "must not have surrounding spaces or control characters")
    if len(ref) > MAX_REF_CHARS:
        raise InvalidInput(field, ref, f"must be at most {MAX_REF_CHARS} characters")
    if "://" in ref:
        return _classify_url(ref, field)
    if ref.startswith(("/", "~")):
        return _classify_path(ref, Path(ref).expanduser(), field)
    if _HF_ID.fullmatch(ref) and "--" not in ref and ".." not in ref and not ref.endswith(".git"):
        return "hf"
    raise InvalidInput(
        field,
        ref,
        "expected a Hugging Face repo id (namespace/name), an absolute local path, a file:// URL or an http(s) URL",
    )


def _classify_url(ref: str, field: str) -> RefKind:
    scheme = ref.split("://", 1)[0].lower()
    if scheme == "file":
        return _classify_path(ref, local_path(ref, field=field), field)
    if scheme not in ("http", "https"):
        raise InvalidInput(field, ref, f"unsupported URL scheme {scheme!r}; use http, https or file")
    try:
        parts = urlsplit(ref)
        host = parts.hostname
    except ValueError as exc:
        raise InvalidInput(field, ref, f"not a valid URL: {exc}") from None
    if not host:
        raise InvalidInput(field, ref, "URL has no host")
    return "url"


def _classify_path(ref: str, path: Path, field: str) -> RefKind:
    if ".." in path.parts:
        raise InvalidInput(field, ref, "path must not contain '..'")
    if not path.is_absolute():
        raise InvalidInput(field, ref, "local paths must be absolute")
    return "local_file" if path.suffix.lower() in WEIGHT_SUFFIXES else "local_dir"


def local_path(ref: str, *, field: str = "model") -> Path:
    """The local path of a path or file:// reference ("~" expanded, not resolved)."""
    if ref.lower().startswith("file://"):
        parts = urlsplit(ref)
        if parts.netloc not in ("", "localhost"):
            raise InvalidInput(field, ref, "file:// URLs must name a local absolute path (file:///...)")
        if parts.query or parts.fragment:
            raise InvalidInput(field, ref, "file:// URLs must not have a query or fragment")
        return Path(unquote(parts.path)).expanduser()
    return Path(ref).expanduser()


def check_variant(variant: str | None) -> str | None:
    """Return `variant` if it is a plausible diffusers variant name ("fp16", "bf16", "non_ema")."""
    if variant is not None and not _VARIANT.fullmatch(variant):
        raise InvalidInput("variant", variant, "must be 1-32 letters, digits or underscores, like 'fp16'")
    return variant


def check_sha256(sha256: str | None) -> str | None:
    """Return `sha256` lower-cased if it is 64 hex digits."""
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise InvalidInput("sha256", sha256, "must be 64 hexadecimal digits")
    return sha256.lower()


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return lowered in SECRET_PARAMS or lowered.startswith(SECRET_PREFIXES)


def public_url(url: str) -> str:
    """`url` without credentials: no user:password, no secret query parameters.

    This is the URL the store logs, puts in errors and progress, keeps in its index and
    announces; two URLs that differ only in their token name the same file.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not _is_secret(k)])
    return urlunsplit((parts.scheme.lower(), netloc.lower(), parts.path or "/", query, ""))


def url_key(url: str) -> str:
    """A short stable folder name for a URL (from its public form)."""
    return hashlib.sha256(public_url(url).encode()).hexdigest()[:20]


def hf_key(repo_id: str) -> str:
    """The index key of a Hugging Face repo (all its variants share one cache folder)."""
    return "hf:" + repo_id

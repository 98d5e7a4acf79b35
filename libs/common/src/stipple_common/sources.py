"""Where models may come from: the operator's source policy, and the checks that apply it.

Any app may name a URL as a model, a LoRA, a VAE, a ControlNet, an embedding or a refiner,
and a node then fetches it. Without a policy that is a server-side request forgery hole
(a URL that names, or redirects to, 169.254.169.254, 10.0.0.1 or localhost reaches into the
node operator's network) and an invitation to fetch whatever an app likes. So the operator
says, in ``STIPPLE_MODEL_SOURCES`` (JSON), what may be fetched:

``hosts``
    URL hosts that may be fetched, exact ("civitai.com") or ``*.suffix`` (subdomains of
    suffix, not suffix itself); ``"*"`` is any host. Default: none (no URLs at all).
``http_hosts``
    Exact hosts that may be fetched over plain http (https only is the default rule).
``private_hosts``
    Exact hosts that may resolve to private, loopback or link-local addresses (a model
    mirror on the operator's own network; ``127.0.0.1`` in tests). No other host may.
``hf``
    Hugging Face repo ids may be named (default true).
``require_sha256``
    A URL must carry the file's sha256 (default true): ``https://host/x.safetensors#sha256=<64 hex>``
    (pip's spelling). The node refuses a file that does not match, so what a URL names
    cannot change after the app chose it.

`check_reference` is pure (no network): the gateway runs it when a task is submitted, and
every node runs it again before fetching (a node trusts nobody). `vet_addresses` is the
node's part: it resolves a host and refuses it if any address is not public (checking
IPv4 addresses hidden in IPv6 forms too); the node then connects to the address it checked,
and checks every redirect again.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from .errors import InvalidInput

ENV_NAME = "STIPPLE_MODEL_SOURCES"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int, float | None], list[str]]
"""(host, port, timeout_s) -> the addresses the host resolves to (strings); raises OSError."""

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_HF_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]{0,95}/)?[A-Za-z0-9][\w.\-]{0,95}$")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


class SourcePolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What an app may name as a model source (see the module docstring)."""

    hosts: list[str] = []
    http_hosts: list[str] = []
    private_hosts: list[str] = []
    hf: bool = True
    require_sha256: bool = True

    def __post_init__(self) -> None:
        for name in ("hosts", "http_hosts", "private_hosts"):
            for host in getattr(self, name):
                pattern = host.lower().rstrip(".")
                if name == "hosts" and pattern == "*":
                    continue
                bare = pattern[2:] if name == "hosts" and pattern.startswith("*.") else pattern
                if not bare or "*" in bare or "/" in bare or " " in bare:
                    raise ValueError(f"{name}: {host!r} is not a host name, an address or (in hosts) *.suffix")

    def allows_host(self, host: str) -> bool:
        host = normal_host(host)
        for pattern in self.hosts:
            pattern = normal_host(pattern)
            if pattern == "*" or host == pattern:
                return True
            if pattern.startswith("*.") and host.endswith(pattern[1:]):
                return True
        return False

    def allows_http(self, host: str) -> bool:
        return normal_host(host) in {normal_host(h) for h in self.http_hosts}

    def allows_private(self, host: str) -> bool:
        return normal_host(host) in {normal_host(h) for h in self.private_hosts}


def normal_host(host: str) -> str:
    """A host as compared: lower case, no trailing dot, no IPv6 brackets."""
    return host.strip().lower().rstrip(".").strip("[]")


def load_policy(env: Mapping[str, str] | None = None) -> SourcePolicy:
    """The policy in ``STIPPLE_MODEL_SOURCES`` (JSON), or the default one when it is unset.

    Raises InvalidSettings naming the variable for bad JSON or an unknown field.
    """
    from .settings import InvalidSettings

    raw = (os.environ if env is None else env).get(ENV_NAME, "").strip()
    if not raw:
        return SourcePolicy()
    try:
        return msgspec.json.decode(raw, type=SourcePolicy)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise InvalidSettings(f"{ENV_NAME}={raw!r}: {exc}") from None


def default_policy() -> SourcePolicy:
    """`load_policy()` of this process's environment (read on each call: it is small)."""
    return load_policy()


def url_sha256(url: str) -> str | None:
    """The sha256 a URL carries in its fragment (``#sha256=<hex>``), lower-cased, or None."""
    _, _, fragment = url.partition("#")
    for part in fragment.split("&"):
        name, _, value = part.partition("=")
        if name.lower() == "sha256":
            return value.lower()
    return None


def check_reference(ref: str, sha256: str | None, policy: SourcePolicy, *, field: str = "model") -> None:
    """Refuse `ref` (InvalidInput naming `field` and `ref`) if the policy does not allow it.

    URLs: the host must be allowed, the scheme https (http only for `http_hosts`), and a
    sha256 must be given (`sha256`, or the URL's ``#sha256=`` fragment) when the policy
    requires one. Hugging Face ids: allowed when `policy.hf`. Local paths and file:// URLs
    are the node's own business (its store decides) and pass. No network is used.
    """
    if "://" in ref:
        scheme = ref.split("://", 1)[0].lower()
        if scheme == "file":
            return
        check_url(ref, policy, field=field)
        given = url_sha256(ref)
        if given is not None and not _SHA256.fullmatch(given):
            raise InvalidInput(field, ref, "the URL's #sha256= fragment must be 64 hexadecimal digits")
        if sha256 is not None and given is not None and sha256.lower() != given:
            raise InvalidInput(field, ref, f"the URL's #sha256= fragment differs from the sha256 given ({sha256})")
        if policy.require_sha256 and sha256 is None and given is None:
            raise InvalidInput(
                field, ref, "not allowed by policy: a URL must carry the file's sha256 (https://host/file#sha256=<hex>)"
            )
        return
    if ref.startswith(("/", "~")):
        return
    if _HF_ID.fullmatch(ref) and not policy.hf:
        raise InvalidInput(field, ref, "not allowed by policy: this network does not fetch Hugging Face repos")


def check_url(url: str, policy: SourcePolicy, *, field: str = "model") -> str:
    """Scheme and host of one URL (the one an app named, or a redirect's): return the host."""
    try:
        parts = httpish(url)
    except ValueError as exc:
        raise InvalidInput(field, url, f"not a valid URL: {exc}") from None
    scheme, host = parts
    if scheme not in ("http", "https"):
        raise InvalidInput(field, url, f"not allowed by policy: scheme {scheme!r} (only https)")
    if not policy.allows_host(host):
        raise InvalidInput(field, url, f"not allowed by policy: host {host!r} is not among the allowed model sources")
    if scheme == "http" and not policy.allows_http(host):
        raise InvalidInput(field, url, f"not allowed by policy: plain http to {host!r} (use https)")
    return host


def httpish(url: str) -> tuple[str, str]:
    """(scheme, host) of a URL; ValueError when it has no host."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError("no host")
    return parts.scheme.lower(), normal_host(parts.hostname)


def address_problem(address: IPAddress) -> str | None:
    """Why `address` must not be fetched from (private, loopback, ...), or None if it is public.

    IPv4 addresses inside IPv6 ones (IPv4-mapped, 6to4, Teredo, NAT64) are judged as the
    IPv4 address they carry, so ``::ffff:127.0.0.1`` is loopback.
    """
    if isinstance(address, ipaddress.IPv6Address):
        inner: ipaddress.IPv4Address | None = address.ipv4_mapped or address.sixtofour
        if inner is None and address.teredo is not None:
            inner = address.teredo[1]
        if inner is None and any(address in net for net in _NAT64):
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            problem = address_problem(inner)
            return f"{problem} (inside {address})" if problem else None
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("not globally routable", not address.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def system_resolver(host: str, port: int, timeout_s: float | None = None) -> list[str]:
    """socket.getaddrinfo in a thread of its own, given up after `timeout_s` (it has no timeout)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="resolve")
    try:
        future = pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            infos: list[Any] = future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"resolving {host} took more than {timeout_s:g} s") from None
    finally:
        pool.shutdown(wait=False)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def vet_addresses(
    host: str,
    port: int,
    policy: SourcePolicy,
    *,
    resolver: Resolver | None = None,
    timeout_s: float | None = None,
    field: str = "url",
) -> list[str]:
    """The addresses of `host` to connect to, every one of them public; InvalidInput if ANY
    is not (an attacker's DNS answers public and private addresses together) unless the
    policy names `host` in `private_hosts`. Address literals are judged without DNS."""
    host = normal_host(host)
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = (resolver or system_resolver)(host, port, timeout_s)
        except (OSError, UnicodeError) as exc:
            raise InvalidInput(field, host, f"cannot resolve the host: {exc}") from None
    if not addresses:
        raise InvalidInput(field, host, "the host has no addresses")
    if policy.allows_private(host):
        return addresses
    for text in addresses:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            raise InvalidInput(field, host, f"refused address {text!r}: not an IP address") from None
        problem = address_problem(address)
        if problem is not None:
            raise InvalidInput(field, host, f"refused address {text}: {problem}")
    return addresses


def check_task_sources(spec: Any, policy: SourcePolicy | None = None) -> None:
    """`check_reference` on every model reference of a canonical TaskSpec, naming its field.

    For the gateway at submit time (`policy` defaults to this process's ``STIPPLE_MODEL_SOURCES``).
    """
    policy = policy or default_policy()
    model = spec.base_model
    refs: list[tuple[str, str]] = [("base_model", model if isinstance(model, str) else model.name)]
    refs += [("vae", spec.vae), ("unet", spec.unet), ("textual_inversion", spec.textual_inversion)]
    refs += [(f"loras[{i}].model", lora.model) for i, lora in enumerate(spec.loras)]
    if getattr(spec, "lora", None) is not None:
        refs.append(("lora.model", spec.lora.model))
    if spec.controlnet is not None:
        refs.append(("controlnet.model", spec.controlnet.model))
    if spec.refiner is not None:
        refs.append(("refiner.model", spec.refiner.model))
    for field, ref in refs:
        if ref:
            check_reference(ref, None, policy, field=field)

"""Settings from environment variables, decoded into msgspec Structs.

Each field ``foo_bar`` of a settings Struct is read from ``STIPPLE_FOO_BAR``. Values are
converted leniently ("8080" -> 8080, "true" -> True); a bad value fails at start with
the variable's name and value, never later.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Literal, TypeVar

import msgspec

from .errors import StippleError
from .subjects import IMAGES_BUCKET

PREFIX = "STIPPLE_"


class InvalidSettings(StippleError):
    code = "invalid_settings"


class CommonSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What every service reads."""

    nats_url: str = "nats://127.0.0.1:4222"  # tls://host:4222 for TLS (nats:// also upgrades when the server asks)
    nats_ca_file: str = ""  # PEM CA bundle that signed the NATS servers' certificates; empty: the system's
    log_level: str = "info"
    log_format: str = "auto"  # auto (console on a terminal, JSON otherwise) | json | console
    metrics_port: int = 0  # 0: no metrics server; -1: any free port
    metrics_host: str = "127.0.0.1"
    stream_replicas: int = 1  # 3 in production (R3 streams)
    stream_max_bytes: int = -1  # caps the TASKS and NODES streams each (-1: the server's disk); set it in production
    declare_streams: bool = True  # create/update the streams at start (off for clients without the right)
    nats_inbox_prefix: str = ""  # reply subjects' prefix; nodes get their own (see permissions.py)
    blob_backend: str = "jetstream"  # jetstream | s3
    blob_bucket: str = IMAGES_BUCKET
    s3_endpoint: str = ""  # host:port of MinIO / S3
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    otlp_endpoint: str = ""  # OTLP/HTTP traces endpoint; empty: traces stay in process
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"  # the process's event loop (eventloop.py)
    # the economics every service must agree on (economics.py: cheating must not pay)
    max_fee: int = 10 * 10**18  # the largest fee a task may carry (smallest token unit; 10 tokens)
    validation_rate: float = 0.1  # r: the share of tasks the VRF selects to run on `replication` nodes and compare
    undetected_rate: float = 0.01  # p: how often a compared wrong result passes (bench/RESULTS.md, "false accept")
    # what every service must agree on about nodes and tasks
    node_ttl_s: float = 10.0  # a node without a heartbeat for this long is not live
    replication: int = 3  # nodes a sampled or `full` task runs on (any task may be: the gateway needs that many live)
    # active/standby replicas of the stateful services (dispatcher, validator, chain-indexer: lease.py)
    lease_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # 0: no lease, serve at once; > 0: its ttl, wait for it
    instance: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$|^$")] = ""  # "": the host name


S = TypeVar("S", bound=msgspec.Struct)


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def load_settings(cls: type[S], env: Mapping[str, str] | None = None) -> S:
    """Build `cls` from the environment (or `env`)."""
    source = os.environ if env is None else env
    values = {}
    for field in msgspec.structs.fields(cls):
        name = env_name(field.name)
        if name in source:
            values[field.name] = source[name]
    try:
        return msgspec.convert(values, cls, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        bad = text.rpartition("`$.")[2].rstrip("`")
        shown = values.get(bad, "")
        raise InvalidSettings(f"{env_name(bad)}={shown!r}: {text.rpartition(' - at ')[0]}") from None


def to_env(settings: msgspec.Struct) -> dict[str, str]:
    """The environment that reproduces `settings` (used to start services as processes)."""
    out = {}
    for field in msgspec.structs.fields(settings):
        value = getattr(settings, field.name)
        out[env_name(field.name)] = str(value).lower() if isinstance(value, bool) else str(value)
    return out

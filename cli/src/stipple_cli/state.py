"""Where the running local network is: the state file `stipple up` writes.

`stipple up` writes it once the network is up and removes it when it stops cleanly; every
other `stipple` command (generate, task, nodes, audit, chain reconcile) reads it, so that
it finds that network without flags. A flag or an environment variable always wins over
it, and a file whose pid is not running (`stipple up` was killed) is ignored, saying so.

The file is ``$STIPPLE_STATE``, else ``$XDG_STATE_HOME/stipple/network.json`` (by default
``~/.local/state/stipple/network.json``): one per user, as `stipple up` binds fixed ports.
It holds a NATS URL with a control-plane user's password (the embedded server makes new
ones at every start), so it is written 0600, and atomically (a temporary file renamed over
it): a reader sees the old file or the new one, never half of one. The temporary file is
made with O_EXCL and the rename replaces a link at the path rather than following it, so a
link planted there (the path may be in a shared folder: ``$STIPPLE_STATE=/tmp/...``) is not
written through.

What the file says is believed only if this user wrote it: a file (or a link's target) that
another user owns, or that others may write, is ignored, saying so. Otherwise another local
user could plant one there that sends this user's prompts, API key and NATS traffic to
servers of theirs (with a pid that runs, such as 1).
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
import time
from pathlib import Path

import msgspec

ENV = "STIPPLE_STATE"
DEFAULT_GATEWAY_URL = "http://127.0.0.1:8080"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class NetworkState(msgspec.Struct, kw_only=True):
    """A running `stipple up`."""

    pid: int  # the `stipple up` process
    started_at: float  # epoch seconds
    data_dir: str  # absolute
    gateway_url: str
    nats_url: str  # with a control-plane user's credentials (user:password@) on the embedded server
    nats_server: str  # the same without credentials, to show
    nats_creds_file: str = ""  # none of ours uses one; kept for an external NATS that does
    chain_url: str = ""  # the chain's JSON-RPC endpoint (devchain.py); "" without a chain
    version: int = 1


_decoder = msgspec.json.Decoder(NetworkState)
_said: set[str] = set()  # what read() said already: once per process is enough


def path() -> Path:
    """The state file's path (it need not exist)."""
    if explicit := os.environ.get(ENV):
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base).expanduser() / "stipple" / "network.json"


def write(state: NetworkState, where: Path | None = None) -> Path:
    """Write `state` atomically (mode 0600); returns the path."""
    where = where or path()
    where.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=where.parent, prefix=f".{where.name}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(msgspec.json.format(msgspec.json.encode(state)) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, where)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return where


def remove(pid: int | None = None, where: Path | None = None) -> None:
    """Remove the state file if it is this process's (`pid`): never another network's."""
    where = where or path()
    pid = os.getpid() if pid is None else pid
    try:
        state = _decoder.decode(where.read_bytes())
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return
    if state.pid == pid:
        where.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it runs
        return True
    return True


def read(command: str = "stipple", where: Path | None = None) -> NetworkState | None:
    """The running network's state, or None: no file, or one to ignore (unreadable, or its
    `stipple up` is not running), which is then said on stderr, starting with `command`."""
    where = where or path()
    try:
        # O_NONBLOCK: a FIFO planted there must not hang the command; fstat: of what was opened
        with os.fdopen(os.open(where, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)), "rb") as file:
            info = os.fstat(file.fileno())
            raw = file.read() if stat.S_ISREG(info.st_mode) else b""
    except FileNotFoundError:
        return None
    except OSError as exc:
        _ignore(command, where, exc.strerror or str(exc))
        return None
    if not stat.S_ISREG(info.st_mode):
        _ignore(command, where, "not a regular file")
        return None
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        _ignore(command, where, f"owned by another user (uid {info.st_uid}); only a file of your own is believed")
        return None
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        _ignore(command, where, f"others may write it (mode {stat.S_IMODE(info.st_mode):o}); `stipple up` writes 600")
        return None
    try:
        state = _decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        _ignore(command, where, f"not a stipple network state ({exc})")
        return None
    if not alive(state.pid):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.started_at))
        _ignore(command, where, f"the `stipple up` that wrote it (pid {state.pid}, started {started}) is not running")
        return None
    return state


def _ignore(command: str, where: Path, why: str) -> None:
    """Say once on stderr why the state file is not used."""
    line = f"{command}: ignoring the state file {where}: {why}"
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr)


def _resolve(flag: str | None, env: str, command: str, field: str, default: str) -> str:
    """`flag`, else the environment variable `env`, else the running network's `field`, else `default`."""
    if flag:
        return flag
    if value := os.environ.get(env):
        return value
    state = read(command)
    return str(getattr(state, field)) if state is not None else default


def gateway_url(flag: str | None, command: str) -> str:
    """The gateway to use: `flag`, else $STIPPLE_GATEWAY_URL, else the running network's, else the default."""
    return _resolve(flag, "STIPPLE_GATEWAY_URL", command, "gateway_url", DEFAULT_GATEWAY_URL)


def nats_url(flag: str | None, command: str) -> str:
    """The NATS URL to use: `flag`, else $STIPPLE_NATS_URL, else the running network's, else the default."""
    return _resolve(flag, "STIPPLE_NATS_URL", command, "nats_url", DEFAULT_NATS_URL)


def chain_url(flag: str | None, command: str) -> str:
    """The chain's JSON-RPC URL: `flag`, else $STIPPLE_CHAIN_URL, else the running network's, else ""."""
    return _resolve(flag, "STIPPLE_CHAIN_URL", command, "chain_url", "")

"""Child processes that `stipple up`, the tests and the benchmarks start and stop, one way.

`ManagedProcess` starts a command with its output in a log file (or on this terminal),
waits until that output shows it is ready (a regular expression or a predicate), says why
it died (the tail of its log), and stops it with SIGTERM, then SIGKILL after a grace
period. `stop_all` stops several, in the order given, under one deadline. nats-server
(stipple_common.natsserver), anvil (stipple_common.chain) and the services of `stipple up`
(stipple_cli.network) run through it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


class ProcessError(RuntimeError):
    """A managed process exited, or did not become ready in time; the message has its log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (for a server that cannot pick its own)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


Ready = str | re.Pattern[str] | Callable[[str], Any]
"""What `wait_ready` looks for in the output: a regular expression (its match is returned),
or a predicate of the whole output since the start (its truthy result is returned)."""


@dataclass
class ManagedProcess:
    """One child process. `start()` it (again after it exited: the log is appended to), read
    its `output()`, `stop()` it. Its output goes to `log_path`, to a temporary file without
    one, or to this terminal with `terminal=True` (then there is nothing to read)."""

    name: str
    cmd: Sequence[str]
    env: Mapping[str, str] | None = None  # None: this process's environment
    log_path: Path | None = None
    terminal: bool = False
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)
    _offset: int = field(default=0, repr=False)  # where this start's output begins in the log

    def start(self) -> ManagedProcess:
        if self.running:
            raise ProcessError(f"{self.name} is still running (pid {self.pid})")
        self._close_log()
        if self.terminal:
            self.process = subprocess.Popen(self.cmd, env=self.env, stdin=subprocess.DEVNULL)
            return self
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("a+b")
        else:
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed when the process stops
        self._offset = self._log.seek(0, os.SEEK_END)
        self.process = subprocess.Popen(
            self.cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def returncode(self) -> int | None:
        """None while it runs (or before it started)."""
        return self.process.poll() if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        """What it wrote since its last start."""
        if self._log is not None and not self._log.closed:
            size = os.fstat(self._log.fileno()).st_size
            data = os.pread(self._log.fileno(), max(0, size - self._offset), self._offset)
        elif self.log_path is not None and self.log_path.exists():
            data = self.log_path.read_bytes()[self._offset :]
        else:
            data = b""
        return data.decode(errors="replace")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def wait_ready(self, ready: Ready, timeout: float) -> Any:
        """Wait until the output shows `ready`, and return what matched. Raises ProcessError
        (and stops the process) when it exits first or `timeout` seconds pass."""
        check: Callable[[str], Any] = ready if callable(ready) else re.compile(ready).search
        deadline = time.monotonic() + timeout
        while True:
            found = check(self.output())
            if found:
                return found
            if not self.running or time.monotonic() > deadline:
                exited = self.returncode is not None
                why = f"exited with code {self.returncode}" if exited else f"was not ready within {timeout:g} s"
                tail = self.tail(40).strip()[-2000:] or "(no output)"
                self.stop()
                raise ProcessError(f"{self.name} {why}: {tail}")
            time.sleep(0.02)

    def terminate(self) -> None:
        """SIGTERM, if it runs (without waiting)."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, if it runs, and wait for it: no clean shutdown."""
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL when it has not exited after `timeout` seconds."""
        stop_all([self], timeout)

    def _wait_or_kill(self, timeout: float) -> None:
        if self.process is not None:
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_all(processes: Iterable[ManagedProcess], timeout: float = 15.0) -> None:
    """SIGTERM each (in the order given), then wait for each under one deadline of `timeout`
    seconds, SIGKILL the ones still running then, and close their logs."""
    processes = list(processes)
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        process._wait_or_kill(max(0.1, deadline - time.monotonic()))

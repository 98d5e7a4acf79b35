"""Managed child processes: ready when their output says so, the log's tail when they die,
SIGTERM then SIGKILL, and a restart that appends to the same log."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from stipple_common.process import ManagedProcess, ProcessError, stop_all


def python(code: str) -> list[str]:
    return [sys.executable, "-u", "-c", code]


def test_ready_on_a_line_then_stopped_by_sigterm(tmp_path: Path) -> None:
    code = "import time; print('listening on 127.0.0.1:4321'); time.sleep(60)"
    with ManagedProcess("server", python(code), log_path=tmp_path / "server.log").start() as process:
        match = process.wait_ready(r"listening on (\S+):(\d+)", timeout=10)
        assert match.group(2) == "4321"
        assert process.running
    assert process.returncode == -15  # SIGTERM
    assert "listening" in (tmp_path / "server.log").read_text()


def test_a_process_that_exits_first_is_an_error_with_its_output() -> None:
    process = ManagedProcess("broken", python("import sys; print('bad config line 3'); sys.exit(3)")).start()
    with pytest.raises(ProcessError, match=r"broken exited with code 3: bad config line 3"):
        process.wait_ready("never printed", timeout=10)


def test_not_ready_in_time_is_an_error_and_the_process_is_stopped() -> None:
    process = ManagedProcess("slow", python("import time; time.sleep(60)")).start()
    with pytest.raises(ProcessError, match="slow was not ready within 0.3 s"):
        process.wait_ready(lambda output: "ready" in output, timeout=0.3)
    assert not process.running


def test_sigkill_after_the_grace_period_when_sigterm_is_ignored() -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up'); time.sleep(60)"
    stubborn = ManagedProcess("stubborn", python(code)).start()
    polite = ManagedProcess("polite", python("import time; print('up'); time.sleep(60)")).start()
    for process in (stubborn, polite):
        process.wait_ready("up", timeout=10)
    started = time.monotonic()
    stop_all([stubborn, polite], timeout=0.5)
    assert time.monotonic() - started < 5
    assert (stubborn.returncode, polite.returncode) == (-9, -15)


def test_a_restart_appends_to_the_log_and_reads_only_its_own_output(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    process = ManagedProcess("service", python("print('run')"), log_path=log).start()
    process.wait_ready(lambda output: process.returncode is not None, timeout=10)
    process.start()
    process.wait_ready(lambda output: process.returncode is not None, timeout=10)
    assert process.output() == "run\n"
    assert log.read_text() == "run\nrun\n"
    process.stop()

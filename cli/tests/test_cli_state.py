"""The state file (state.py): written atomically and privately, found, ignored when its
`stipple up` is gone, and always second to a flag or an environment variable."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stipple_cli import state


def a_state(**changes: object) -> state.NetworkState:
    fields: dict[str, object] = {
        "pid": os.getpid(),
        "started_at": time.time(),
        "data_dir": "/tmp/stipple-data",
        "gateway_url": "http://127.0.0.1:18080",
        "nats_url": "nats://validator:secret@127.0.0.1:14222",
        "nats_server": "nats://127.0.0.1:14222",
        "chain_url": "http://127.0.0.1:18545",
    }
    return state.NetworkState(**{**fields, **changes})  # type: ignore[arg-type]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_path_is_stipple_state_else_xdg_state_home_else_local_state(monkeypatch, tmp_path):
    monkeypatch.setenv("STIPPLE_STATE", str(tmp_path / "mine.json"))
    assert state.path() == tmp_path / "mine.json"
    monkeypatch.delenv("STIPPLE_STATE")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state.path() == tmp_path / "xdg" / "stipple" / "network.json"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert state.path() == tmp_path / "home" / ".local" / "state" / "stipple" / "network.json"


def test_a_written_state_is_read_back_private_and_whole(state_file: Path):
    written = a_state()
    assert state.write(written) == state_file
    assert state.read() == written
    assert state_file.stat().st_mode & 0o777 == 0o600  # it holds a NATS password
    assert [p.name for p in state_file.parent.iterdir()] == ["network.json"]  # no temporary file left
    state.write(a_state(gateway_url="http://127.0.0.1:18081"))  # replaced whole
    found = state.read()
    assert found is not None
    assert found.gateway_url == "http://127.0.0.1:18081"


def test_a_state_whose_stipple_up_is_gone_is_ignored_saying_so(state_file: Path, capsys):
    pid = dead_pid()
    state.write(a_state(pid=pid))
    assert state.read("stipple nodes") is None
    err = capsys.readouterr().err
    assert f"stipple nodes: ignoring the state file {state_file}" in err
    assert f"pid {pid}" in err
    assert "is not running" in err
    assert state.gateway_url(None, "stipple nodes") == state.DEFAULT_GATEWAY_URL


def test_an_unreadable_state_is_ignored_saying_so(state_file: Path, capsys):
    state_file.parent.mkdir(parents=True)
    state_file.write_text('{"pid": "not a number"}')
    assert state.read("stipple task") is None
    assert "not a stipple network state" in capsys.readouterr().err


def test_no_state_file_is_no_network_and_no_message(capsys):
    assert state.read() is None
    assert state.nats_url(None, "stipple audit") == state.DEFAULT_NATS_URL
    assert capsys.readouterr().err == ""


def test_remove_removes_only_this_process_state(state_file: Path):
    state.write(a_state(pid=os.getpid() + 1_000_000))  # another network's
    state.remove()
    assert state_file.exists()
    state.write(a_state())
    state.remove()
    assert not state_file.exists()
    state.remove()  # nothing to remove: no error


def test_a_flag_then_the_environment_then_the_state_then_the_default(monkeypatch):
    state.write(a_state())
    assert state.gateway_url(None, "t") == "http://127.0.0.1:18080"
    assert state.nats_url(None, "t") == "nats://validator:secret@127.0.0.1:14222"
    assert state.chain_url(None, "t") == "http://127.0.0.1:18545"
    monkeypatch.setenv("STIPPLE_GATEWAY_URL", "http://env:1")
    monkeypatch.setenv("STIPPLE_NATS_URL", "nats://env:2")
    monkeypatch.setenv("STIPPLE_CHAIN_URL", "http://env:3")
    assert state.gateway_url(None, "t") == "http://env:1"
    assert state.nats_url(None, "t") == "nats://env:2"
    assert state.chain_url(None, "t") == "http://env:3"
    assert state.gateway_url("http://flag:1", "t") == "http://flag:1"
    assert state.nats_url("nats://flag:2", "t") == "nats://flag:2"
    assert state.chain_url("http://flag:3", "t") == "http://flag:3"


@pytest.mark.parametrize("missing", ["pid", "gateway_url"])
def test_a_state_without_a_required_field_is_ignored(state_file: Path, missing: str, capsys):
    import msgspec

    raw = msgspec.to_builtins(a_state())
    del raw[missing]
    state_file.parent.mkdir(parents=True)
    state_file.write_bytes(msgspec.json.encode(raw))
    assert state.read() is None
    assert missing in capsys.readouterr().err

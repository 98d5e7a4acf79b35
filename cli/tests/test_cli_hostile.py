"""`stipple up`'s state file and dev chain tried as another local user, or a web page in this
user's browser, would: a state file planted in a shared folder (another user's, writable by
others, a FIFO, a link) is not believed or not written through; the dev chain binds loopback
only, answers only a loopback Host and a JSON body, reads no more than its limit, and
answers garbage with JSON-RPC errors, still serving afterwards."""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from stipple_cli import devchain, state


def a_state(**changes: Any) -> state.NetworkState:
    fields: dict[str, Any] = {
        "pid": os.getpid(),
        "started_at": time.time(),
        "data_dir": "/tmp/stipple-data",
        "gateway_url": "http://127.0.0.1:18080",
        "nats_url": "nats://validator:secret@127.0.0.1:14222",
        "nats_server": "nats://127.0.0.1:14222",
    }
    return state.NetworkState(**{**fields, **changes})


# --------------------------------------------------------------------------- the state file


def planted(where: Path, **changes: Any) -> None:
    """What another user would put there: a live pid (1 always runs) and their own servers."""
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_bytes(json.dumps({**state.msgspec.structs.asdict(a_state(pid=1)), **changes}).encode())


def test_a_state_file_others_may_write_is_ignored(state_file, capsys):
    planted(state_file, gateway_url="http://evil.example:80")
    os.chmod(state_file, 0o666)
    assert state.read("stipple generate") is None
    assert state.gateway_url(None, "stipple generate") == state.DEFAULT_GATEWAY_URL
    assert "others may write it (mode 666)" in capsys.readouterr().err
    os.chmod(state_file, 0o620)
    assert state.read("stipple generate") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_state_file_another_user_owns_is_ignored(state_file, capsys):
    planted(state_file, gateway_url="http://evil.example:80", nats_url="nats://evil.example:4222")
    os.chmod(state_file, 0o600)
    os.chown(state_file, 65534, 65534)
    assert state.read("stipple task") is None
    assert state.nats_url(None, "stipple task") == state.DEFAULT_NATS_URL
    assert "owned by another user (uid 65534)" in capsys.readouterr().err


def test_a_link_to_another_users_file_is_judged_by_its_target(state_file, tmp_path):
    target = tmp_path / "theirs.json"
    planted(target, gateway_url="http://evil.example:80")
    os.chmod(target, 0o666)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.symlink_to(target)
    assert state.read() is None


def test_a_fifo_planted_at_the_path_neither_hangs_a_command_nor_is_believed(state_file, capsys):
    state_file.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(state_file)
    assert state.read("stipple nodes") is None  # open() without O_NONBLOCK would wait for a writer forever
    assert "not a regular file" in capsys.readouterr().err


def test_writing_replaces_a_planted_link_and_never_writes_through_it(state_file, tmp_path):
    victim = tmp_path / "victims-file"
    victim.write_text("keep me")
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.symlink_to(victim)
    state.write(a_state())
    assert victim.read_text() == "keep me"
    assert not state_file.is_symlink()
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert state.read() == a_state(started_at=state.read().started_at)  # type: ignore[union-attr]
    assert [p.name for p in state_file.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_an_own_private_state_file_is_still_believed(state_file):
    state.write(a_state(gateway_url="http://127.0.0.1:18081"))
    assert state.gateway_url(None, "stipple") == "http://127.0.0.1:18081"


# --------------------------------------------------------------------------- the dev chain


@pytest.fixture(scope="module")
def chain():
    """A fresh EVM served on a loopback port, with short client timeouts (no contracts: the
    server's refusals do not need them)."""
    patch = pytest.MonkeyPatch()
    patch.setattr(devchain, "REQUEST_TIMEOUT_S", 1.0)
    served = devchain.DevChain(block_s=3600).start()
    yield served
    served.stop()
    patch.undo()


def post(chain: devchain.DevChain, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    port = int(chain.url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    sent = {"Content-Type": "application/json", **(headers or {})}
    connection.request("POST", "/", body=body, headers=sent)
    answer = connection.getresponse()
    data = answer.read()
    connection.close()
    return answer.status, json.loads(data) if data else None


def block_number(chain: devchain.DevChain) -> Any:
    status, answer = post(chain, b'{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":[]}')
    assert status == 200
    return answer["result"]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com", ""])
def test_the_dev_chain_serves_on_loopback_only(host):
    with pytest.raises(ValueError, match="loopback"):
        devchain.DevChain(host=host).start()


def test_the_dev_chain_is_bound_to_127_0_0_1(chain):
    assert chain._server is not None
    assert chain._server.server_address[0] == "127.0.0.1"
    assert chain.url.startswith("http://127.0.0.1:")


@pytest.mark.parametrize(
    ("headers", "status", "says"),
    [
        ({"Host": "evil.example:8545"}, 403, "only a loopback host"),  # DNS rebinding
        ({"Host": "127.0.0.1.evil.example"}, 403, "only a loopback host"),
        ({"Content-Type": "text/plain"}, 415, "expected application/json"),  # a cross-site "simple" request
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "expected application/json"),
        ({"Content-Length": "-5"}, 411, "expected the body's size"),
        ({"Content-Length": "abc"}, 411, "expected the body's size"),
        ({"Content-Length": str(devchain.MAX_REQUEST_BYTES + 1)}, 413, "over the limit"),
    ],
)
def test_the_dev_chain_refuses_other_hosts_other_bodies_and_oversize_bodies(chain, headers, status, says):
    port = int(chain.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sent = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Content-Length": "2", **headers}
        head = "POST / HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in sent.items()) + "\r\n"
        sock.sendall(head.encode() + b"{}")  # the body is never read when refused
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == status
        body = json.loads(answer.read())
    assert body["error"]["code"] == -32600
    assert says in body["error"]["message"]
    assert isinstance(block_number(chain), int)  # still serving


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", -32700),
        (b"\xff\xfe\x00", -32700),  # not UTF-8
        (b"[" * 100_000 + b"]" * 100_000, -32700),  # json.loads would overflow the C stack: SIGSEGV
        (b"[]", -32600),
        (b"[" + b",".join([b"{}"] * (devchain.MAX_BATCH + 1)) + b"]", -32600),
        (b"42", -32600),
        (b'"eth_blockNumber"', -32600),
        (b'{"method": 7}', -32600),
        (b'{"jsonrpc":"2.0","id":1,"method":"eth_getBalance","params":"nope"}', -32000),
        (b'{"jsonrpc":"2.0","id":1,"method":"no_such_method","params":[]}', -32601),
    ],
)
def test_the_dev_chain_answers_garbage_with_a_json_rpc_error_and_keeps_serving(chain, body, code):
    status, answer = post(chain, body)
    assert status == 200
    errors = [a["error"] for a in answer] if isinstance(answer, list) else [answer["error"]]
    assert {e["code"] for e in errors} == {code}
    assert isinstance(block_number(chain), int)


def test_a_stalled_client_cannot_hold_the_dev_chain(chain):
    """One thread serves: a client that sends half a request and waits is dropped after
    REQUEST_TIMEOUT_S, and the next request is answered."""
    port = int(chain.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as stalled:
        stalled.sendall(
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 99\r\n\r\n{"
        )
        assert isinstance(block_number(chain), int)

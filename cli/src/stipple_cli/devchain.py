"""`stipple up`'s chain: the in-process EVM, served on a loopback JSON-RPC endpoint.

Before this, `stipple up` ran the chain-indexer on its embedded chain
(``STIPPLE_CHAIN_URL=eth-tester://``): an EVM in the indexer's own memory, which nothing
else could read, so `stipple chain reconcile` (and any wallet or script) had nothing to
compare the projections with. Now `stipple up` keeps that same EVM (eth-tester on py-evm)
in its own process and serves it on ``http://127.0.0.1:<port>``; the chain-indexer reaches
it as it reaches any chain (its JSON-RPC mode: deployment and account given), and so does
everything else. The URL is in the `chain` KV bucket and in the state file (state.py).

Why this and not another way:

- eth-tester rather than anvil: anvil comes from npm (contracts/node_modules, x86-64 Linux
  only) and `stipple up` must run with nothing installed; it is the same EVM as before, so
  nothing else changes (the chain is still new at every start).
- the standard library's ``http.server`` rather than Starlette/uvicorn or a package: no
  maintained JSON-RPC server for eth-tester exists (eth-tester-rpc is abandoned), the CLI
  does not depend on a web framework, and eth-tester is not thread-safe, so one thread that
  answers one request at a time is what it needs anyway. Between requests the same thread
  mines a block every `block_s` (``service_actions``), as the indexer did for its embedded
  chain, so that events gain their confirmations.
- a thread of `stipple up`, not a process: it is not one of our services, and the
  deployment and the nodes' funding below are plain calls before anything is served.
- requests go through web3's own eth-tester formatting (the provider's middleware), so a
  JSON-RPC client sees what an in-process web3 sees; a revert answers as geth and anvil do
  (code 3, ``data``: the revert data), so custom errors still decode (stipple_common.chain).

What the indexer did for its embedded chain is done here: the contracts are deployed and
the custodial account funded (`deploy`), and as the relay's faucet answers only on the
embedded chain, each node's key gets its minimum stake in tokens and gas money (`fund`)
before the node starts; the node then stakes with its own key, as elsewhere.

The chain lives in memory and is new at every start (as the embedded one was), while NATS
keeps its streams in the data dir: with a data dir reused from an earlier run, `stipple
chain reconcile` rightly reports that run's paid tasks as never escrowed on this chain.

Its accounts are unlocked (``eth_sendTransaction`` from the deployer, which holds every
role, slashes and pays), so only this machine may reach it, and no web page: it binds a
loopback address only (`start` refuses another); it answers only a Host of that loopback
address or ``localhost`` (a DNS-rebinding page names its own host) and only a JSON body
(``Content-Type: application/json``: a cross-site form or ``fetch`` cannot send one without
a preflight, which is not answered); it reads at most `MAX_REQUEST_BYTES` (else 413, unread)
and `MAX_BATCH` calls a request, nested at most `MAX_DEPTH` deep (checked before parsing:
`json_depth`), waits at most `REQUEST_TIMEOUT_S` for a slow client (one thread serves, so a
stalled one must not hold it), and answers garbage with a JSON-RPC error, never a traceback.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from stipple_common import chain as ch

TOKEN = 10**18
GAS_MONEY = 10 * TOKEN  # ether each node gets for its approve and stake
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # a JSON-RPC request's body (a contract's deployment is tens of KB)
MAX_BATCH = 1000  # calls in one batch request
REQUEST_TIMEOUT_S = 10.0  # for a client's request line, headers and body (one thread serves them all)
MAX_DEPTH = 32  # how deeply a request's JSON may nest (a JSON-RPC call nests 3 or 4 levels)
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*\\?(?:"|\Z)', re.DOTALL)  # a string (or its unclosed rest)
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _STEP)


def json_depth(body: bytes) -> int:
    """How deeply the JSON text `body` nests, from its brackets outside strings, before the
    parser sees it. web3 imports py_ecc, which raises Python's recursion limit to 100,000, so
    ``json.loads`` of a body nested ~50,000 deep (100 KB) overflows the C stack and kills
    `stipple up` (SIGSEGV) instead of raising RecursionError."""
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


def is_loopback(host: str) -> bool:
    """`host` (an address or ``localhost``) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class DevChain:
    """The EVM and its JSON-RPC server. `start()` serves it; `url` is where; `stop()` ends it."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: a free one
    block_s: float = 1.0  # an empty block this often
    w3: Any = None  # once started: the in-process Web3 (use only before start() or after stop())
    deployment: ch.Deployment | None = None
    _server: HTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://{self.host}:{self._server.server_address[1]}"

    @property
    def account(self) -> str:
        """The deployer: every role, and the custodial deposit (the indexer's STIPPLE_ACCOUNT)."""
        return str(self.w3.eth.accounts[0])

    def create(self) -> DevChain:
        """A fresh EVM (its ten accounts unlocked and funded); not served yet."""
        from web3.middleware import combine_middleware

        self.w3 = ch.connect(ch.EMBEDDED_URL)
        provider = self.w3.provider
        self._request = combine_middleware(
            middleware=provider._middleware,  # eth-tester's request and result formatting, nothing else
            w3=self.w3,
            provider_request_fn=provider.make_request,
        )
        return self

    def deploy(self, *, min_stake: int, cooldown_s: int = 7 * 24 * 3600, deposit: int = 1_000_000 * TOKEN) -> None:
        """The three contracts, account 0 holding every role and `deposit` tokens deposited for apps
        (what the chain-indexer does at the start of its embedded chain)."""
        admin = self.account
        self.deployment = ch.deploy_all(
            self.w3,
            admin,
            min_stake=min_stake,
            cooldown_s=cooldown_s,
            treasury=self.w3.eth.accounts[1],
            validator=admin,
            gateway=admin,
            settler=admin,
        )
        chain = ch.StippleChain(self.w3, self.deployment)
        chain.mint(admin, admin, deposit)
        chain.deposit(admin, deposit)

    def fund(self, addresses: list[str], tokens: int) -> None:
        """Give each address `tokens` and gas money (what the embedded chain's faucet gave a node)."""
        assert self.deployment is not None, "deploy first"
        chain = ch.StippleChain(self.w3, self.deployment)
        for address in addresses:
            self.w3.eth.send_transaction({"from": self.account, "to": address, "value": GAS_MONEY})
            chain.mint(self.account, address, tokens)

    def indexer_env(self) -> dict[str, str]:
        """The chain-indexer's settings for this chain."""
        assert self.deployment is not None, "deploy first"
        d = self.deployment
        return {
            "STIPPLE_CHAIN_URL": self.url,
            "STIPPLE_DEPLOYMENT": f"token={d.token},staking={d.staking},payment={d.payment}",
            "STIPPLE_ACCOUNT": self.account,
        }

    def start(self) -> DevChain:
        """Serve the EVM (created if need be) on a thread of this process."""
        if not is_loopback(self.host):
            raise ValueError(f"the dev chain serves on a loopback address only, not {self.host!r}")
        if self.w3 is None:
            self.create()
        chain = self

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT_S

            def do_POST(self) -> None:
                status, refusal = self.refusal()
                if refusal:
                    self.close_connection = True  # a body left unread must not be taken for the next request
                    self.reply(status, _error(None, -32600, refusal))
                    return
                try:
                    body = self.rfile.read(int(self.headers["Content-Length"]))
                except OSError:  # timed out (REQUEST_TIMEOUT_S) or gone: nobody to answer
                    self.close_connection = True
                    return
                try:
                    if (depth := json_depth(body)) > MAX_DEPTH:
                        raise ValueError(f"the body nests {depth} levels deep; the limit is {MAX_DEPTH}")
                    request = json.loads(body)
                except (ValueError, RecursionError) as exc:
                    answer: Any = _error(None, -32700, f"parse error: {str(exc)[:200]}")
                else:
                    if isinstance(request, list) and not 0 < len(request) <= MAX_BATCH:
                        answer = _error(None, -32600, f"invalid request: a batch holds 1 to {MAX_BATCH} calls")
                    elif isinstance(request, list):
                        answer = [chain.answer(r) for r in request]
                    else:
                        answer = chain.answer(request)
                self.reply(200, answer)

            def refusal(self) -> tuple[int, str]:
                """(HTTP status, why) for a request not to read, or (200, "")."""
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
                if not is_loopback(host):
                    return 403, f"Host {self.headers.get('Host')!r}: only a loopback host is served"
                media = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                if media != "application/json":
                    return 415, f"Content-Type {media!r}: expected application/json"
                length = self.headers.get("Content-Length") or ""
                if not length.isdigit():
                    return 411, f"Content-Length {length[:40]!r}: expected the body's size in bytes"
                if int(length) > MAX_REQUEST_BYTES:
                    return 413, f"a body of {length} bytes is over the limit of {MAX_REQUEST_BYTES}"
                return 200, ""

            def reply(self, status: int, answer: Any) -> None:
                try:
                    data = json.dumps(answer, default=_hex).encode()
                except (TypeError, ValueError) as exc:  # a value eth-tester answered that JSON cannot say
                    data = json.dumps(_error(None, -32603, f"internal error: {exc}")).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per request would drown `stipple up`'s terminal

        class Server(HTTPServer):
            next_block = time.monotonic() + self.block_s

            def service_actions(self) -> None:  # between requests, on the serving thread
                if time.monotonic() >= self.next_block:
                    self.next_block = time.monotonic() + chain.block_s
                    chain.w3.provider.ethereum_tester.mine_blocks(1)

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client gone mid-answer: the default prints a traceback over `stipple up`'s output

        self._server = Server((self.host, self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), name="devchain", daemon=True)
        self._thread.start()
        return self

    def answer(self, request: Any) -> dict[str, Any]:
        """One JSON-RPC request's answer."""
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            return _error(None, -32600, "invalid request: expected an object with a method")
        rid, params = request.get("id"), request.get("params") or []
        try:
            response = dict(self._request(request["method"], params))
        except ch.REVERT_ERRORS as exc:
            data = getattr(exc, "data", None)
            error = _error(rid, 3, "execution reverted")
            if isinstance(data, bytes):
                error["error"]["data"] = "0x" + data.hex()
            return error
        except Exception as exc:  # eth-tester's refusals (a bad nonce, a bad parameter), said as a node says them
            return _error(rid, -32000, str(exc))
        response["id"] = rid
        return response

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _error(rid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}


def _hex(value: Any) -> Any:
    """JSON for what eth-tester answers besides plain values: bytes (and HexBytes) as 0x-hex."""
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, dict | list | tuple):  # web3's AttributeDict and friends
        return dict(value) if hasattr(value, "keys") else list(value)
    raise TypeError(f"{type(value).__name__} is not JSON")

"""Typed helpers for Stipple's contracts (contracts/): load the artifacts, connect, deploy, call.

The contracts are StippleToken (the ERC-20), NodeStaking (stake, cooldown, slash) and
TaskPayment (deposit, escrow, settle by QoS share, refund); contracts/README.md has their
rules. This module is the one place the services touch web3.py, so that they see Python
values and Stipple errors rather than ABI details:

- `connect(url)`: a `Web3` for a JSON-RPC URL, or for the in-process EVM (eth-tester on
  py-evm) with `EMBEDDED_URL`, the default that needs nothing installed.
- `deploy_all(...)`: the three contracts wired together, returning their `Deployment`.
- `StippleChain`: views and transactions on a deployment. A revert raises `ContractReverted`
  naming the contract's custom error and its arguments (``TaskAlreadySettled(taskId=0x…)``).
- `Anvil`: an anvil node from the npm package in contracts/node_modules, on a free port.

Task ids are strings off-chain and `bytes32` on-chain: `task_key(task_id)` is the keccak-256
of the id's UTF-8 bytes, the same for every service.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eth_account.signers.local import LocalAccount
from eth_tester.exceptions import TransactionFailed
from eth_typing import ABIElement, ABIEvent, ChecksumAddress
from eth_utils import keccak, to_checksum_address
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractLogicError, TimeExhausted
from web3.types import RPCEndpoint, TxReceipt

from stipple_common.errors import StippleError
from stipple_common.process import ManagedProcess, ProcessError

if TYPE_CHECKING:
    from typing_extensions import TypeIs  # typing.TypeIs is 3.13+

EMBEDDED_URL = "eth-tester://"
"""`connect()` URL of the in-process EVM (py-evm through eth-tester)."""

ARTIFACTS_ENV = "STIPPLE_CONTRACTS_ARTIFACTS"
"""Environment variable naming an artifacts folder to use instead of contracts/artifacts."""

CONTRACT_NAMES = ("StippleToken", "NodeStaking", "TaskPayment")

LOCK_STAMP = ".stipple-installed"
"""File in contracts/node_modules holding the sha256 of the package-lock.json installed (./dev writes it too)."""

Sender = str | LocalAccount
"""Who signs a transaction: the address of an account the node unlocks (eth-tester, anvil), or a local key."""


class ChainError(StippleError):
    """Something about the chain went wrong: a missing artifact, a bad URL, a failed transaction."""

    code = "chain_error"


class ChainUnavailable(ChainError):
    """The JSON-RPC endpoint does not answer; trying again later may work."""

    code = "chain_unavailable"
    retryable = True


class ContractReverted(ChainError):
    """A contract call reverted. `error` is the custom error's name (``"TaskAlreadySettled"``),
    `args` its decoded arguments by name; `error` is ``"unknown"`` when the revert data matches
    no error in the artifacts."""

    code = "contract_reverted"

    def __init__(self, contract: str, function: str, error: str, args: dict[str, Any], data: bytes) -> None:
        shown = ", ".join(f"{k}={_show(v)}" for k, v in args.items())
        super().__init__(f"{contract}.{function} reverted: {error}({shown})")
        self.contract = contract
        self.function = function
        self.error = error
        self.args_by_name = args
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "error": self.error, "args": {k: _show(v) for k, v in self.args_by_name.items()}}


def _show(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)


# ---------------------------------------------------------------- artifacts


def contracts_dir() -> Path:
    """The repository's contracts/ folder, found by walking up from this file."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "contracts"
        if (candidate / "package.json").is_file() and (candidate / "src").is_dir():
            return candidate
    raise ChainError(f"no contracts/ folder above {here}; set {ARTIFACTS_ENV} to the artifacts folder")


def artifacts_dir(override: str | Path | None = None) -> Path:
    """Where the compiled artifacts are: `override`, else ${ARTIFACTS_ENV}, else contracts/artifacts."""
    if override is not None:
        return Path(override)
    env = os.environ.get(ARTIFACTS_ENV)
    if env:
        return Path(env)
    return contracts_dir() / "artifacts"


@dataclass(frozen=True)
class Artifact:
    """One compiled contract, as contracts/compile.js writes it."""

    name: str
    abi: list[dict[str, Any]]
    bytecode: str
    compiler: dict[str, Any]


def load_artifacts(path: str | Path | None = None) -> dict[str, Artifact]:
    """The three contracts' artifacts by name, from `artifacts_dir(path)`."""
    folder = artifacts_dir(path)
    out: dict[str, Artifact] = {}
    for name in CONTRACT_NAMES:
        file = folder / f"{name}.json"
        try:
            raw = json.loads(file.read_text())
        except FileNotFoundError:
            raise ChainError(
                f"artifact {file} not found (build with: cd contracts && npm ci && node compile.js)"
            ) from None
        out[name] = Artifact(name=name, abi=raw["abi"], bytecode=raw["bytecode"], compiler=raw["compiler"])
    return out


# ---------------------------------------------------------------- connecting


def connect(url: str, *, timeout_s: float = 10.0) -> Web3:
    """A `Web3` for `url`: ``http(s)://…`` for a JSON-RPC node, `EMBEDDED_URL` for a fresh in-process EVM
    (its ten accounts unlocked and funded). Raises `ChainUnavailable` when the node does not answer."""
    if url == EMBEDDED_URL:
        return _embedded()
    if not url.startswith(("http://", "https://")):
        raise ChainError(f"chain URL {url!r}: expected http://, https:// or {EMBEDDED_URL!r}")
    w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": timeout_s}))
    if not w3.is_connected():
        raise ChainUnavailable(f"chain URL {url!r}: no JSON-RPC answer within {timeout_s}s")
    return w3


class _EmbeddedRevert(Exception):
    """A revert in the in-process EVM, with its raw revert data."""

    def __init__(self, data: bytes) -> None:
        super().__init__(f"execution reverted: 0x{data.hex()}")
        self.data = data


def _embedded() -> Web3:
    """web3's eth-tester provider, except that reverts keep their raw data: web3 decodes any
    revert data as Error(string) when it can, which garbles custom errors whose first
    argument is a string (ZeroAddress("treasury") would read as Error("treasury"))."""
    from web3 import EthereumTesterProvider
    from web3.providers.eth_tester.defaults import API_ENDPOINTS

    def keep_revert_data(delegate: Any) -> Any:
        def call(tester: Any, params: Any) -> Any:
            try:
                return delegate(tester, params)
            except TransactionFailed as exc:
                data = _tester_revert_data(exc)
                if data is None:
                    raise
                raise _EmbeddedRevert(data) from exc

        return call

    endpoints = {namespace: dict(methods) for namespace, methods in API_ENDPOINTS.items()}
    for method in ("call", "estimateGas", "sendTransaction", "sendRawTransaction"):
        endpoints["eth"][method] = keep_revert_data(endpoints["eth"][method])
    return Web3(EthereumTesterProvider(api_endpoints=endpoints))


# What a revert raises, on any backend (for code that sends transactions itself)
REVERT_ERRORS: tuple[type[Exception], ...] = (ContractLogicError, _EmbeddedRevert, TransactionFailed)


def _tester_revert_data(exc: Exception) -> bytes | None:
    """eth-tester's TransactionFailed carries the revert data as bytes, as the EVMRevert that
    holds them, or (from `call`) as the repr of the bytes in a string."""
    raw: Any = exc.args[0] if exc.args else None
    if isinstance(raw, Exception):
        raw = raw.args[0] if raw.args else None
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, str) and raw.startswith(("b'", 'b"')):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return None
        return value if isinstance(value, bytes) else None
    return None


def is_embedded(w3: Web3) -> bool:
    """Whether `w3` talks to the in-process EVM (eth-tester)."""
    return hasattr(w3.provider, "ethereum_tester")


def increase_time(w3: Web3, seconds: int) -> None:
    """Moves the chain's clock forward by `seconds` and mines a block (test and dev chains only)."""
    if is_embedded(w3):
        latest = w3.eth.get_block("latest")["timestamp"]
        w3.provider.ethereum_tester.time_travel(latest + seconds)  # type: ignore[attr-defined]
    else:
        _rpc(w3, "evm_increaseTime", [seconds])
        _rpc(w3, "evm_mine", [])


def snapshot(w3: Web3) -> Any:
    """Saves the chain's state; `revert(w3, snapshot_id)` returns to it (test and dev chains only)."""
    if is_embedded(w3):
        return w3.provider.ethereum_tester.take_snapshot()  # type: ignore[attr-defined]
    return _rpc(w3, "evm_snapshot", [])


def revert(w3: Web3, snapshot_id: Any) -> None:
    """Returns the chain to `snapshot_id` (anvil forgets the snapshot then: take a new one to go back again)."""
    if is_embedded(w3):
        w3.provider.ethereum_tester.revert_to_snapshot(snapshot_id)  # type: ignore[attr-defined]
    elif not _rpc(w3, "evm_revert", [snapshot_id]):
        raise ChainError(f"evm_revert to snapshot {snapshot_id!r} failed")


def _rpc(w3: Web3, method: str, params: list[Any]) -> Any:
    response = w3.provider.make_request(RPCEndpoint(method), params)
    if "error" in response:
        raise ChainError(f"{method}{params}: {response['error']}")
    return response.get("result")


# ---------------------------------------------------------------- deploying


def task_key(task_id: str) -> bytes:
    """The `bytes32` a task is known by on-chain: keccak-256 of its id's UTF-8 bytes."""
    if not task_id:
        raise ValueError("task_id: must not be empty")
    return keccak(text=task_id)


@dataclass(frozen=True)
class Deployment:
    """Addresses of one deployment of the three contracts."""

    token: ChecksumAddress
    staking: ChecksumAddress
    payment: ChecksumAddress

    def to_dict(self) -> dict[str, str]:
        return {"token": self.token, "staking": self.staking, "payment": self.payment}

    @classmethod
    def from_dict(cls, raw: dict[str, str]) -> Deployment:
        return cls(**{k: to_checksum_address(raw[k]) for k in ("token", "staking", "payment")})


def deploy_all(
    w3: Web3,
    admin: Sender,
    *,
    min_stake: int,
    cooldown_s: int,
    treasury: str,
    validator: str | None = None,
    gateway: str | None = None,
    settler: str | None = None,
    artifacts: dict[str, Artifact] | None = None,
) -> Deployment:
    """Deploys the token, the staking and the payment contracts, `admin` holding every role.
    `validator`, `gateway` and `settler`, when given, also get VALIDATOR_ROLE (slash),
    GATEWAY_ROLE (escrow) and SETTLER_ROLE (settle, refund)."""
    if min_stake < 0:
        raise ValueError(f"min_stake: must be >= 0 (got {min_stake})")
    if cooldown_s < 0:
        raise ValueError(f"cooldown_s: must be >= 0 (got {cooldown_s})")
    arts = artifacts if artifacts is not None else load_artifacts()
    admin_address = _address(admin)
    token = _deploy(w3, arts["StippleToken"], admin, admin_address)
    staking = _deploy(w3, arts["NodeStaking"], admin, token, admin_address, min_stake, cooldown_s, treasury)
    payment = _deploy(w3, arts["TaskPayment"], admin, token, admin_address)
    deployment = Deployment(token=token, staking=staking, payment=payment)
    chain = StippleChain(w3, deployment, arts)
    if validator is not None:
        chain.grant_role(admin, "NodeStaking", "VALIDATOR_ROLE", validator)
    if gateway is not None:
        chain.grant_role(admin, "TaskPayment", "GATEWAY_ROLE", gateway)
    if settler is not None:
        chain.grant_role(admin, "TaskPayment", "SETTLER_ROLE", settler)
    return deployment


def _deploy(w3: Web3, artifact: Artifact, sender: Sender, *args: Any) -> ChecksumAddress:
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    receipt = _transact(w3, factory.constructor(*args), sender, artifact.name, "constructor", _ErrorDecoder([artifact]))
    address = receipt["contractAddress"]
    if address is None:
        raise ChainError(f"deploying {artifact.name}: the receipt has no contract address")
    return address


# ---------------------------------------------------------------- calling


class TaskState(IntEnum):
    """TaskPayment.TaskState."""

    NONE = 0
    ESCROWED = 1
    SETTLED = 2
    REFUNDED = 3


@dataclass(frozen=True)
class TaskRecord:
    """A task as TaskPayment holds it."""

    app: ChecksumAddress
    fee: int
    state: TaskState


@dataclass(frozen=True)
class Settlement:
    """One task to settle: its fee goes to `nodes` in proportion to `shares` (QoS shares, any
    non-negative integers, not all zero); the rounding dust goes to the first node."""

    task_id: str
    nodes: Sequence[str]
    shares: Sequence[int]

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError(f"Settlement {self.task_id}: nodes must not be empty")
        if len(self.nodes) != len(self.shares):
            shown = list(self.shares)
            raise ValueError(f"Settlement {self.task_id}: {len(self.nodes)} nodes but {len(shown)} shares ({shown})")
        if any(s < 0 for s in self.shares) or sum(self.shares) == 0:
            raise ValueError(f"Settlement {self.task_id}: shares must be >= 0 and not all 0 (got {list(self.shares)})")


@dataclass(frozen=True)
class ChainEvent:
    """One decoded log of a Stipple contract."""

    contract: str
    name: str
    args: dict[str, Any]
    block_number: int
    block_hash: bytes
    log_index: int
    tx_hash: bytes


@dataclass
class StippleChain:
    """Views and transactions on one `Deployment`. Each transaction method takes the `sender`
    first, waits for the receipt and returns it; a revert raises `ContractReverted`."""

    w3: Web3
    deployment: Deployment
    artifacts: dict[str, Artifact] = field(default_factory=load_artifacts)
    receipt_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        self.token: Contract = self.w3.eth.contract(
            address=self.deployment.token, abi=self.artifacts["StippleToken"].abi
        )
        self.staking: Contract = self.w3.eth.contract(
            address=self.deployment.staking, abi=self.artifacts["NodeStaking"].abi
        )
        self.payment: Contract = self.w3.eth.contract(
            address=self.deployment.payment, abi=self.artifacts["TaskPayment"].abi
        )
        self._by_name = {"StippleToken": self.token, "NodeStaking": self.staking, "TaskPayment": self.payment}
        self._by_address = {c.address: (name, c) for name, c in self._by_name.items()}
        # (address, topic 0) -> the event that decodes it: worked out once, not per log
        self._events = {
            (c.address, _topic(item)): c.events[item["name"]]()
            for c in self._by_name.values()
            for item in c.abi
            if _is_event(item)
        }
        self._errors = _ErrorDecoder(self.artifacts.values())

    # views

    def minimum_stake(self) -> int:
        return int(self.staking.functions.minimumStake().call())

    def cooldown_s(self) -> int:
        return int(self.staking.functions.cooldown().call())

    def treasury(self) -> ChecksumAddress:
        return to_checksum_address(self.staking.functions.treasury().call())

    def stake_of(self, node: str) -> int:
        """Tokens `node` has staked (still counted during its unstake cooldown)."""
        return int(self.staking.functions.stakeOf(node).call())

    def unstake_available_at(self, node: str) -> int:
        """Unix time from which `node` may withdraw its stake; 0 when it has not asked to unstake."""
        return int(self.staking.functions.unstakeAvailableAt(node).call())

    def is_active(self, node: str) -> bool:
        """Whether `node` holds at least the minimum stake and is not leaving."""
        return bool(self.staking.functions.isActive(node).call())

    def owner_of(self, node: str) -> ChecksumAddress | None:
        """Who owns `node`'s stake: its operator, or `node` itself when it staked for itself;
        None when nobody holds a stake for it (never staked, or withdrawn)."""
        owner = to_checksum_address(self.staking.functions.ownerOf(node).call())
        return None if int(owner, 16) == 0 else owner

    def token_balance(self, account: str) -> int:
        """`account`'s STPL tokens in its wallet (not in the contracts)."""
        return int(self.token.functions.balanceOf(account).call())

    def balance_of(self, account: str) -> int:
        """`account`'s balance in TaskPayment: an app's deposits less escrow, a node's earnings."""
        return int(self.payment.functions.balanceOf(account).call())

    def total_escrowed(self) -> int:
        return int(self.payment.functions.totalEscrowed().call())

    def task(self, task_id: str) -> TaskRecord:
        app, fee, state = self.payment.functions.taskOf(task_key(task_id)).call()
        return TaskRecord(app=to_checksum_address(app), fee=int(fee), state=TaskState(state))

    def has_role(self, contract: str, role: str, account: str) -> bool:
        c = self._by_name[contract]
        return bool(c.functions.hasRole(_role_id(role), account).call())

    # transactions

    def grant_role(self, sender: Sender, contract: str, role: str, account: str) -> TxReceipt:
        """Grants `role` (``"VALIDATOR_ROLE"``, ``"GATEWAY_ROLE"``, ``"SETTLER_ROLE"``, ``"MINTER_ROLE"``,
        ``"DEFAULT_ADMIN_ROLE"``) on `contract` (a name in CONTRACT_NAMES) to `account`."""
        if contract not in self._by_name:
            raise ValueError(f"contract: expected one of {CONTRACT_NAMES} (got {contract!r})")
        return self._send(sender, contract, "grantRole", _role_id(role), account)

    def mint(self, sender: Sender, to: str, amount: int) -> TxReceipt:
        return self._send(sender, "StippleToken", "mint", to, amount)

    def transfer(self, sender: Sender, to: str, amount: int) -> TxReceipt:
        return self._send(sender, "StippleToken", "transfer", to, amount)

    def approve(self, sender: Sender, spender: str, amount: int) -> TxReceipt:
        return self._send(sender, "StippleToken", "approve", spender, amount)

    def stake(self, sender: Sender, amount: int, *, approve: bool = True) -> TxReceipt:
        """Stakes `amount` of the sender's tokens, approving NodeStaking for them first unless told not to."""
        if approve:
            self.approve(sender, self.deployment.staking, amount)
        return self._send(sender, "NodeStaking", "stake", amount)

    def stake_for(self, sender: Sender, node: str, amount: int, *, approve: bool = True) -> TxReceipt:
        """Stakes `amount` of the sender's tokens for `node`, which the sender (its operator) runs:
        the sender owns the stake and gets it back. Approves NodeStaking first unless told not to.
        Reverts with NotStakeOwner when another address owns `node`'s stake."""
        if approve:
            self.approve(sender, self.deployment.staking, amount)
        return self._send(sender, "NodeStaking", "stakeFor", node, amount)

    def request_unstake(self, sender: Sender, node: str | None = None) -> TxReceipt:
        """Starts the cooldown of `node`'s stake (its owner only); without `node`, of the
        sender's own stake (a node that staked for itself)."""
        if node is None:
            return self._send(sender, "NodeStaking", "requestUnstake")
        return self._send(sender, "NodeStaking", "requestUnstakeFor", node)

    def withdraw_stake(self, sender: Sender, node: str | None = None) -> TxReceipt:
        """Returns `node`'s stake to its owner, the sender, after the cooldown; without `node`,
        the sender's own stake (a node that staked for itself)."""
        if node is None:
            return self._send(sender, "NodeStaking", "withdraw")
        return self._send(sender, "NodeStaking", "withdrawFor", node)

    def slash(self, sender: Sender, node: str, amount: int, task_id: str) -> TxReceipt:
        """Takes `amount` of `node`'s stake to the treasury for a wrong result in `task_id`
        (VALIDATOR_ROLE; once per node and task: a second time reverts with AlreadySlashed)."""
        return self._send(sender, "NodeStaking", "slash", node, amount, task_key(task_id))

    def slashed_for(self, node: str, task_id: str) -> bool:
        """Whether `node` was slashed for `task_id` already."""
        return bool(self.staking.functions.slashedFor(node, task_key(task_id)).call())

    def deposit(self, sender: Sender, amount: int, *, approve: bool = True) -> TxReceipt:
        """Deposits `amount` of the sender's tokens into its TaskPayment balance, approving first unless told not to."""
        if approve:
            self.approve(sender, self.deployment.payment, amount)
        return self._send(sender, "TaskPayment", "deposit", amount)

    def withdraw(self, sender: Sender, amount: int) -> TxReceipt:
        """Withdraws `amount` of the sender's TaskPayment balance to its wallet."""
        return self._send(sender, "TaskPayment", "withdraw", amount)

    def escrow(self, sender: Sender, task_id: str, app: str, fee: int) -> TxReceipt:
        """Holds `fee` of `app`'s balance for `task_id` (GATEWAY_ROLE; once per task)."""
        return self._send(sender, "TaskPayment", "escrow", task_key(task_id), app, fee)

    def escrow_many(self, sender: Sender, escrows: Sequence[tuple[str, str, int]]) -> TxReceipt:
        """`escrow` for every (task_id, app, fee) in one transaction (GATEWAY_ROLE); all or none."""
        if not escrows:
            raise ValueError("escrows: must not be empty")
        return self._send(
            sender,
            "TaskPayment",
            "escrowMany",
            [task_key(t) for t, _, _ in escrows],
            [a for _, a, _ in escrows],
            [f for _, _, f in escrows],
        )

    def settle(self, sender: Sender, settlements: Sequence[Settlement]) -> TxReceipt:
        """Settles every task in `settlements` in one transaction (SETTLER_ROLE); all or none."""
        if not settlements:
            raise ValueError("settlements: must not be empty")
        return self._send(
            sender,
            "TaskPayment",
            "settle",
            [task_key(s.task_id) for s in settlements],
            [list(s.nodes) for s in settlements],
            [list(s.shares) for s in settlements],
        )

    def refund(self, sender: Sender, task_ids: Sequence[str]) -> TxReceipt:
        """Returns each task's fee to its app (SETTLER_ROLE), in one transaction; all or none."""
        if not task_ids:
            raise ValueError("task_ids: must not be empty")
        return self._send(sender, "TaskPayment", "refund", [task_key(t) for t in task_ids])

    # events

    def events(self, receipt: TxReceipt) -> list[ChainEvent]:
        """The Stipple events in `receipt`, decoded, in log order."""
        return self.decode_logs(receipt["logs"])

    def decode_logs(self, logs: Iterable[Any]) -> list[ChainEvent]:
        """Decodes the logs that Stipple's contracts emitted (others are skipped)."""
        out = []
        for log in logs:
            address = to_checksum_address(log["address"])
            found = self._by_address.get(address)
            if found is None or not log["topics"]:
                continue
            name, _ = found
            event = self._events.get((address, bytes(log["topics"][0])))
            if event is None:
                continue
            decoded = event.process_log(log)
            out.append(
                ChainEvent(
                    contract=name,
                    name=decoded["event"],
                    args=dict(decoded["args"]),
                    block_number=int(log["blockNumber"]),
                    block_hash=bytes(log["blockHash"]),
                    log_index=int(log["logIndex"]),
                    tx_hash=bytes(log["transactionHash"]),
                )
            )
        return out

    def _send(self, sender: Sender, contract: str, function: str, *args: Any) -> TxReceipt:
        fn = getattr(self._by_name[contract].functions, function)(*args)
        return _transact(self.w3, fn, sender, contract, function, self._errors, self.receipt_timeout_s)


def _address(sender: Sender) -> ChecksumAddress:
    return sender.address if isinstance(sender, LocalAccount) else to_checksum_address(sender)


def _role_id(role: str) -> bytes:
    if role == "DEFAULT_ADMIN_ROLE":
        return b"\x00" * 32
    if not re.fullmatch(r"[A-Z_]+_ROLE", role):
        raise ValueError(f"role: expected a name like 'SETTLER_ROLE' (got {role!r})")
    return keccak(text=role)


def _is_event(item: ABIElement) -> TypeIs[ABIEvent]:
    return item.get("type") == "event"


def _topic(item: Mapping[str, Any]) -> bytes:
    """An ABI event's topic 0: keccak-256 of its signature."""
    return keccak(text=f"{item['name']}({','.join(_abi_type(i) for i in item['inputs'])})")


def _abi_type(item: Mapping[str, Any]) -> str:
    kind: str = item["type"]
    if kind.startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in item["components"]) + ")" + kind[len("tuple") :]
    return kind


def _transact(
    w3: Web3,
    fn: Any,
    sender: Sender,
    contract: str,
    function: str,
    errors: _ErrorDecoder,
    timeout_s: float = 120.0,
) -> TxReceipt:
    """Sends `fn` from `sender` and waits for the receipt. The gas estimate runs the call
    first, so a revert surfaces here, before anything is sent, with the contract's error."""
    address = _address(sender)
    try:
        if isinstance(sender, LocalAccount):
            tx = fn.build_transaction({"from": address, "nonce": w3.eth.get_transaction_count(address, "pending")})
            signed = sender.sign_transaction(tx)
            tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
        else:
            tx_hash = fn.transact({"from": address})
    except (ContractLogicError, _EmbeddedRevert, TransactionFailed) as exc:
        raise errors.reverted(contract, function, exc) from exc
    except OSError as exc:  # requests' connection errors and timeouts are OSErrors
        raise ChainUnavailable(f"{contract}.{function}: the chain node did not answer: {exc}") from exc
    try:
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout_s)
    except TimeExhausted as exc:
        raise ChainUnavailable(
            f"{contract}.{function}: tx 0x{bytes(tx_hash).hex()} not mined within {timeout_s}s"
        ) from exc
    if receipt["status"] != 1:
        raise ContractReverted(contract, function, "unknown", {"tx": bytes(tx_hash)}, b"")
    return receipt


class _ErrorDecoder:
    """Maps revert data to the custom error it encodes, using the errors in the artifacts' ABIs
    (OpenZeppelin's among them, e.g. AccessControlUnauthorizedAccount)."""

    _STANDARD = {
        keccak(text="Error(string)")[:4]: ("Error", ["string"], ["message"]),
        keccak(text="Panic(uint256)")[:4]: ("Panic", ["uint256"], ["code"]),
    }

    def __init__(self, artifacts: Iterable[Artifact]) -> None:
        self._by_selector: dict[bytes, tuple[str, list[str], list[str]]] = dict(self._STANDARD)
        for artifact in artifacts:
            for item in artifact.abi:
                if item.get("type") != "error":
                    continue
                types = [_abi_type(i) for i in item["inputs"]]
                selector = keccak(text=f"{item['name']}({','.join(types)})")[:4]
                self._by_selector[selector] = (item["name"], types, [i["name"] for i in item["inputs"]])

    def reverted(self, contract: str, function: str, exc: Exception) -> ContractReverted:
        data, reason = _revert_payload(exc)
        if data is None:
            return ContractReverted(contract, function, "Error", {"message": reason}, b"")
        return self.decode(contract, function, data)

    def decode(self, contract: str, function: str, data: bytes) -> ContractReverted:
        from eth_abi import decode
        from eth_abi.exceptions import DecodingError

        known = self._by_selector.get(data[:4])
        if known is None:
            return ContractReverted(contract, function, "unknown", {"data": data}, data)
        name, types, names = known
        try:
            decoded = decode(types, data[4:])
        except DecodingError:
            return ContractReverted(contract, function, name, {"data": data[4:]}, data)
        values = [to_checksum_address(v) if t == "address" else v for t, v in zip(types, decoded, strict=True)]
        return ContractReverted(contract, function, name, dict(zip(names, values, strict=True)), data)


def _revert_payload(exc: Exception) -> tuple[bytes | None, str]:
    """(revert data, text) from web3's ContractLogicError (JSON-RPC nodes) or the in-process EVM."""
    if isinstance(exc, _EmbeddedRevert):
        return exc.data, str(exc)
    if isinstance(exc, ContractLogicError):
        raw = exc.data["data"] if isinstance(exc.data, dict) else exc.data
        if isinstance(raw, str) and raw.startswith("0x"):
            return bytes.fromhex(raw[2:]), str(exc)
    return None, str(getattr(exc, "message", None) or exc)


# ---------------------------------------------------------------- anvil


def node_modules_installed(contracts: Path | None = None) -> bool:
    """Whether contracts/node_modules holds what package-lock.json pins (the stamp ./dev writes)."""
    folder = contracts or contracts_dir()
    stamp = folder / "node_modules" / LOCK_STAMP
    want = hashlib.sha256((folder / "package-lock.json").read_bytes()).hexdigest()
    return stamp.is_file() and stamp.read_text().strip() == want


def install_node_modules(contracts: Path | None = None, *, timeout_s: float = 600.0) -> None:
    """Runs ``npm ci`` in contracts/ unless the lock file's packages are installed already."""
    folder = contracts or contracts_dir()
    if node_modules_installed(folder):
        return
    npm = shutil.which("npm")
    if npm is None:
        raise ChainError("npm not found: install Node.js 20+ (apt-get install nodejs npm) to build the contracts")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        raise ChainError(f"npm ci in {folder} failed with code {result.returncode}: {result.stderr.strip()[-2000:]}")
    want = hashlib.sha256((folder / "package-lock.json").read_bytes()).hexdigest()
    (folder / "node_modules" / LOCK_STAMP).write_text(want + "\n")


def anvil_binary(contracts: Path | None = None) -> Path:
    """The anvil binary of the @foundry-rs/anvil-linux-amd64 npm package (or anvil on PATH)."""
    folder = contracts or contracts_dir()
    candidate = folder / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
    if candidate.is_file():
        return candidate
    found = shutil.which("anvil")
    if found:
        return Path(found)
    raise ChainError(f"anvil not found at {candidate} nor on PATH (run npm ci in {folder}; linux x86-64 only)")


_ANVIL_LISTEN = re.compile(r"Listening on (\S+):(\d+)")


@dataclass
class Anvil:
    """A running anvil node on a port it picked itself. Use as a context manager or call stop()."""

    process: ManagedProcess
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @classmethod
    def start(cls, *, binary: Path | None = None, extra_args: Sequence[str] = (), timeout_s: float = 20.0) -> Anvil:
        """Starts anvil with ``--port 0`` and reads the port it chose from its output."""
        cmd = [str(binary or anvil_binary()), "--host", "127.0.0.1", "--port", "0", *extra_args]
        process = ManagedProcess("anvil", cmd).start()
        try:
            match = process.wait_ready(_ANVIL_LISTEN, timeout_s)
        except ProcessError as exc:
            raise ChainError(f"anvil did not start: {exc}") from None
        return cls(process=process, host=match.group(1), port=int(match.group(2)))

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> Anvil:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "ARTIFACTS_ENV",
    "CONTRACT_NAMES",
    "EMBEDDED_URL",
    "REVERT_ERRORS",
    "Anvil",
    "Artifact",
    "ChainError",
    "ChainEvent",
    "ChainUnavailable",
    "ContractReverted",
    "Deployment",
    "Sender",
    "Settlement",
    "StippleChain",
    "TaskRecord",
    "TaskState",
    "anvil_binary",
    "artifacts_dir",
    "connect",
    "contracts_dir",
    "deploy_all",
    "increase_time",
    "install_node_modules",
    "is_embedded",
    "load_artifacts",
    "node_modules_installed",
    "revert",
    "snapshot",
    "task_key",
]

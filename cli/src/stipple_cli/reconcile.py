"""`stipple chain reconcile`: compare what the network believes about the chain with the chain.

The chain-indexer keeps projections of the chain in NATS, and the rest of the network acts
on them: the dispatcher trusts the `stakes` bucket, apps trust that a task that ended was
paid or refunded. A bug, a lost message or a hand-edited bucket would make the two drift
apart silently; this command reads both sides and prints every difference:

- stakes: every node id (lower-case address) in the `stakes` KV projection, and every node
  that announced itself in the NODES stream (``nodes.<id>.joined``), against
  ``NodeStaking.stakeOf``, ``unstakeAvailableAt`` (leaving when not 0) and ``ownerOf`` (the
  operator: "self" when the node owns its own stake or nobody holds one). A difference says
  whether the chain changed after the indexer's cursor (the indexer is behind or stopped) or
  the projection is wrong at the cursor's block too (a bug, or a bucket edited by hand). A
  key that is not a node id is a difference of its own (the indexer writes none such).
- tasks: every task of the TASKS stream submitted with a fee and ended (its first
  ``succeeded``, ``aborted`` or ``cancelled``) must be in the state the settler's rule
  gives (stipple_common.settlement): SETTLED on TaskPayment (succeeded, with an agreeing
  node) or REFUNDED (otherwise), with the fee of its submission; one not ended yet must
  not be settled or refunded. Outcomes younger than `grace_s` that the chain has not
  caught up with are counted as pending instead.
- chain events: every ``chain.TaskPayment.Settled`` / ``Refunded`` in the CHAIN stream (less
  those voided by ``chain.reorg``) must match the task's state, fee and app on chain.

Exit status: 0 when everything agrees, 1 when anything differs, 2 when the comparison
cannot run (NATS or the chain unreachable, no deployment, the embedded chain).

Without flags it reconciles the network `stipple up` runs (its state file, state.py): its
NATS and its chain, which `stipple up` serves on a loopback JSON-RPC endpoint (devchain.py).
A chain-indexer run on its own embedded chain (``eth-tester://``) keeps that EVM inside its
process, where nothing outside can read it: that one cannot be reconciled.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from eth_utils import to_checksum_address
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from web3.exceptions import Web3Exception

from stipple_common import bus, records, settlement, subjects
from stipple_common import chain as ch
from stipple_common.errors import Rejected
from stipple_common.identity import is_node_id, node_id_of
from stipple_common.logs import redact
from stipple_common.messages import (
    ChainLog,
    ChainReorg,
    NodeJoined,
    TaskAborted,
    TaskCancelled,
    TaskSubmitted,
    TaskSucceeded,
    chain_decoder,
    decode_node_event,
    task_event_decoder,
)
from stipple_common.records import IndexedStake

from . import state
from .connect import connect

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
OUTCOMES = ("succeeded", "aborted", "cancelled")
Outcome = TaskSucceeded | TaskAborted | TaskCancelled
Kind = Literal["stake", "task", "chain_event"]


class ReconcileError(Exception):
    """The comparison cannot run; the message says which input is missing or wrong (exit 2)."""


@dataclass(frozen=True)
class Difference:
    """One thing on which the projections and the chain disagree, with both values as text."""

    kind: Kind
    thing: str  # what disagrees: "node 0x…", "task 3f2a…", "chain.TaskPayment.Settled 0x…:2"
    projection: str  # the value the network holds (its projection, stream or bucket)
    chain: str  # the value on chain
    note: str = ""  # why it may differ, when that can be told

    def line(self) -> str:
        text = f"{self.kind:<11} {self.thing}: projection {self.projection}; chain {self.chain}"
        return f"{text} ({self.note})" if self.note else text


@dataclass
class Report:
    differences: list[Difference] = field(default_factory=list)
    stakes_checked: int = 0
    tasks_checked: int = 0
    events_checked: int = 0
    pending: int = 0  # ended tasks within the grace period that the chain has not caught up with
    cursor: int = -1  # the last block the indexer published (-1: none)
    head: int = 0

    @property
    def agree(self) -> bool:
        return not self.differences

    def summary(self) -> str:
        checked = (
            f"{self.stakes_checked} stakes, {self.tasks_checked} paid tasks, "
            f"{self.events_checked} settlement events checked; indexer cursor {self.cursor}, chain head {self.head}"
        )
        pending = f"; {self.pending} ended tasks within the grace period not settled yet" if self.pending else ""
        verdict = "all agree" if self.agree else f"{len(self.differences)} differences"
        return f"{verdict}: {checked}{pending}"


@dataclass(frozen=True)
class StakeState:
    """A node's stake as the comparison sees it, from the projection or from the chain;
    `owner` in node-id form, "" when the node owns its own stake or nobody holds one."""

    stake: int
    leaving: bool
    owner: str

    @classmethod
    def indexed(cls, node_id: str, entry: IndexedStake) -> StakeState:
        return cls(entry.stake, entry.leaving, "" if entry.owner in ("", node_id) else entry.owner)

    def show(self) -> str:
        return f"stake={self.stake} leaving={_yes(self.leaving)} owner={self.owner or 'self'}"


def _show_indexed(node_id: str, entry: IndexedStake) -> str:
    return f"{StakeState.indexed(node_id, entry).show()} (block {entry.block})"


@dataclass(frozen=True)
class Ended:
    """A task's first outcome in the TASKS stream."""

    name: str  # succeeded | aborted | cancelled
    event: Outcome
    at: float  # the stream's timestamp of the outcome
    sequence: int


@dataclass
class Snapshot:
    """What the network holds, read from NATS once; compare() holds it against the chain."""

    stakes: dict[str, IndexedStake] = field(default_factory=dict)  # node id -> entry
    bad_keys: dict[str, bytes] = field(default_factory=dict)  # `stakes` keys that are not node ids -> value
    addresses: dict[str, str] = field(default_factory=dict)  # announced node id -> checksummed address
    paid: dict[str, TaskSubmitted] = field(default_factory=dict)  # task id -> its submission, fee > 0
    ended: dict[str, Ended] = field(default_factory=dict)  # task id -> its first outcome
    payment_events: list[ChainLog] = field(default_factory=list)  # Settled / Refunded, reorgs removed
    cursor: int = -1


async def read_snapshot(js: JetStreamContext) -> Snapshot:
    """Read the projections and streams the comparison needs; the `stakes` bucket must exist."""
    snap = Snapshot()
    try:
        chain_kv = await js.key_value(subjects.CHAIN_BUCKET)
        cursor = await records.get(chain_kv, records.CURSOR_KEY, records.cursor_decoder)
        snap.cursor = cursor.number if cursor is not None else -1
    except BucketNotFoundError:
        snap.cursor = -1
    try:
        stakes_kv = await js.key_value(subjects.STAKES_BUCKET)
    except BucketNotFoundError:
        raise ReconcileError(
            f"no {subjects.STAKES_BUCKET!r} KV bucket on this NATS: has a chain-indexer run against it?"
        ) from None
    for key in await records.keys(stakes_kv):
        try:
            entry = await stakes_kv.get(key)
        except KeyNotFoundError:  # deleted between the listing and the read
            continue
        value = entry.value or b"{}"
        indexed = _decode(records.indexed_stake_decoder, value)
        if is_node_id(key) and indexed is not None:
            snap.stakes[key] = indexed
        else:
            snap.bad_keys[key] = value

    for msg in await _read(js, subjects.NODES_STREAM, subjects.node_subject("*", "joined")):
        try:
            event = decode_node_event(msg.subject, msg.data)  # the node id from the subject, checked
        except Rejected:
            continue
        if isinstance(event, NodeJoined) and event.address:
            snap.addresses[event.node_id] = to_checksum_address(event.address)

    for msg in await _read(js, subjects.TASKS_STREAM, subjects.all_tasks("submitted")):
        event = _decode(task_event_decoder, msg.data)
        if isinstance(event, TaskSubmitted) and event.fee > 0:
            snap.paid.setdefault(event.task_id, event)
    outcome_msgs = [m for name in OUTCOMES for m in await _read(js, subjects.TASKS_STREAM, subjects.all_tasks(name))]
    for msg in sorted(outcome_msgs, key=lambda m: m.metadata.sequence.stream):
        event = _decode(task_event_decoder, msg.data)
        if isinstance(event, Outcome) and event.task_id not in snap.ended:
            name = subjects.subject_token(msg.subject, 2)
            at = msg.metadata.timestamp.timestamp()
            snap.ended[event.task_id] = Ended(name, event, at, msg.metadata.sequence.stream)

    voided = set()
    for msg in await _read(js, subjects.CHAIN_STREAM, subjects.CHAIN_REORG):
        reorg = _decode(chain_decoder, msg.data)
        if isinstance(reorg, ChainReorg):
            voided.update(reorg.orphaned)
    for name in ("Settled", "Refunded"):
        for msg in await _read(js, subjects.CHAIN_STREAM, subjects.chain_subject("TaskPayment", name)):
            log = _decode(chain_decoder, msg.data)
            if isinstance(log, ChainLog) and log.block_hash not in voided:
                snap.payment_events.append(log)
    return snap


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes) -> Any:
    """A message, or None for one no service could read either (the consumers term those)."""
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


async def _read(js: JetStreamContext, stream: str, subject: str) -> list[Any]:
    try:
        return await bus.read_messages(js, stream, subject)
    except NotFoundError:  # the stream does not exist (no service declared it): nothing in it
        return []


def compare(snap: Snapshot, chain: ch.StippleChain, *, grace_s: float = 0.0, now: float | None = None) -> Report:
    """Hold `snap` against `chain` (blocking JSON-RPC calls); every disagreement is a Difference."""
    now = time.time() if now is None else now
    report = Report(cursor=snap.cursor, head=int(chain.w3.eth.block_number))
    _compare_stakes(snap, chain, report)
    _compare_tasks(snap, chain, report, grace_s=grace_s, now=now)
    _compare_events(snap, chain, report)
    return report


async def reconcile(
    js: JetStreamContext, chain: ch.StippleChain, *, grace_s: float = 0.0, now: float | None = None
) -> Report:
    """Read the network's side from NATS and compare it with `chain`; the differences are in the Report."""
    snap = await read_snapshot(js)
    return await asyncio.to_thread(compare, snap, chain, grace_s=grace_s, now=now)


def _compare_stakes(snap: Snapshot, chain: ch.StippleChain, report: Report) -> None:
    for key, value in sorted(snap.bad_keys.items()):
        report.differences.append(
            Difference(
                kind="stake",
                thing=f"stakes key {key!r}",
                projection=value.decode(errors="replace")[:200],
                chain="-",
                note="not a node id (a lower-case address) with an IndexedStake: the chain-indexer writes none such",
            )
        )
    for node_id in sorted(set(snap.stakes) | set(snap.addresses)):
        entry = snap.stakes.get(node_id)
        indexed = StakeState.indexed(node_id, entry) if entry is not None else None
        on_chain = _stake_at(chain, node_id, "latest")
        report.stakes_checked += 1
        if indexed is None and on_chain == StakeState(0, False, ""):
            continue  # announced, never staked: nothing to index
        if indexed == on_chain:
            continue
        note = ""
        if report.cursor >= 0 and report.cursor < report.head:
            try:
                at_cursor = _stake_at(chain, node_id, report.cursor)
            except ch.ChainError:  # a node that keeps no history of old states
                at_cursor = None
            if at_cursor is not None:
                seen = indexed or StakeState(0, False, "")
                note = (
                    f"changed on chain after block {report.cursor}, the indexer's cursor: it is behind or stopped"
                    if seen == at_cursor
                    else f"wrong at block {report.cursor}, the indexer's cursor, too"
                )
        elif report.cursor >= 0:
            note = f"wrong at block {report.cursor}, the indexer's cursor, which is the chain head"
        report.differences.append(
            Difference(
                kind="stake",
                thing=f"node {node_id}",
                projection=_show_indexed(node_id, entry) if entry is not None else "none",
                chain=on_chain.show(),
                note=note,
            )
        )


def _stake_at(chain: ch.StippleChain, node_id: str, block: int | str) -> StakeState:
    """`node_id`'s stake, leaving and owner at `block`: NodeStaking's views read at that block."""
    address = to_checksum_address(node_id)
    views = chain.staking.functions
    try:
        stake = int(views.stakeOf(address).call(block_identifier=block))
        available_at = int(views.unstakeAvailableAt(address).call(block_identifier=block))
        owner = node_id_of(str(views.ownerOf(address).call(block_identifier=block)))
    except (OSError, ValueError, Web3Exception) as exc:  # connection errors; a pruned or missing block
        raise ch.ChainError(f"NodeStaking views of {address} at block {block}: {exc}") from exc
    return StakeState(stake, available_at != 0, "" if owner in (node_id, "0x" + "00" * 20) else owner)


def _compare_tasks(snap: Snapshot, chain: ch.StippleChain, report: Report, *, grace_s: float, now: float) -> None:
    final = (ch.TaskState.SETTLED, ch.TaskState.REFUNDED)
    for task_id, submitted in snap.paid.items():
        record = chain.task(task_id)
        report.tasks_checked += 1
        ended = snap.ended.get(task_id)
        if ended is None:
            if record.state in final:
                report.differences.append(
                    Difference(
                        kind="task",
                        thing=f"task {task_id}",
                        projection=f"not ended (fee {submitted.fee})",
                        chain=_show_record(record),
                    )
                )
            continue
        expected = settlement.final_state(ended.event)
        shown = f"{ended.name} (fee {submitted.fee}) -> {expected.name}"
        if record.state == expected:
            if record.fee != submitted.fee:
                report.differences.append(
                    Difference(kind="task", thing=f"task {task_id} fee", projection=shown, chain=_show_record(record))
                )
            continue
        age = now - ended.at
        if record.state not in final and age < grace_s:
            report.pending += 1
            continue
        report.differences.append(
            Difference(
                kind="task",
                thing=f"task {task_id}",
                projection=shown,
                chain=_show_record(record),
                note=f"ended at {_utc(ended.at)}" if record.state not in final else "",
            )
        )


def _compare_events(snap: Snapshot, chain: ch.StippleChain, report: Report) -> None:
    ids_by_key = {"0x" + ch.task_key(t).hex(): t for t in {*snap.paid, *snap.ended}}
    for log in snap.payment_events:
        key = str(log.args.get("taskId", ""))
        app, fee, state = chain.payment.functions.taskOf(bytes.fromhex(key.removeprefix("0x"))).call()
        record = ch.TaskRecord(app=to_checksum_address(app), fee=int(fee), state=ch.TaskState(state))
        report.events_checked += 1
        expected = ch.TaskState.SETTLED if log.event == "Settled" else ch.TaskState.REFUNDED
        said_app = str(log.args.get("app", ""))
        said_fee = int(str(log.args.get("fee", 0)))
        if record.state == expected and record.fee == said_fee and record.app == said_app:
            continue
        task = ids_by_key.get(key, key)
        report.differences.append(
            Difference(
                kind="chain_event",
                thing=f"chain.TaskPayment.{log.event} of task {task} (block {log.block_number}, tx {log.tx_hash})",
                projection=f"{expected.name} fee={said_fee} app={said_app}",
                chain=_show_record(record),
            )
        )


def _show_record(record: ch.TaskRecord) -> str:
    if record.state == ch.TaskState.NONE:
        return "NONE (never escrowed)"
    return f"{record.state.name} fee={record.fee} app={record.app}"


def _utc(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# ---------------------------------------------------------------- the command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stipple chain", description="The chain, as the network sees it.")
    sub = p.add_subparsers(dest="chain_command", required=True)
    r = sub.add_parser(
        "reconcile",
        help="compare the chain-indexer's projections with the chain; print every difference",
        description="Compare the stakes projection, the paid tasks' outcomes and the settlement events in NATS "
        "with the chain. Exit 0 when all agree, 1 when anything differs, 2 when the comparison cannot run.",
    )
    r.add_argument(
        "--nats-url",
        default=None,
        help=f"NATS server (env STIPPLE_NATS_URL; default: the network `stipple up` runs, else {DEFAULT_NATS_URL})",
    )
    r.add_argument(
        "--nats-ca-file",
        default=os.environ.get("STIPPLE_NATS_CA_FILE", ""),
        help="PEM CA bundle of the NATS servers' certificates, for tls:// (env STIPPLE_NATS_CA_FILE)",
    )
    r.add_argument(
        "--chain-url",
        default=None,
        help="the chain's JSON-RPC URL (env STIPPLE_CHAIN_URL; default: the chain of the network `stipple up` runs "
        "when NATS is that network's too, else the URL the indexer put in the chain bucket)",
    )
    r.add_argument(
        "--deployment",
        default="",
        help="token=0x..,staking=0x..,payment=0x.. (default: the `deployment` key of the chain KV bucket)",
    )
    r.add_argument(
        "--grace-s",
        type=float,
        default=30.0,
        help="an ended task the chain has not settled yet counts as pending for this long (default 30)",
    )
    return p


@dataclass(frozen=True)
class Target:
    """The chain to compare with: its URL, the contracts, and the chain id the indexer saw (0: unknown)."""

    url: str
    deployment: ch.Deployment
    chain_id: int


async def _target(js: JetStreamContext, chain_url: str, spec: str) -> Target:
    stored: records.ChainDeployment | None = None
    try:
        kv = await js.key_value(subjects.CHAIN_BUCKET)
        stored = await records.get(kv, records.DEPLOYMENT_KEY, records.deployment_decoder)
    except BucketNotFoundError:
        pass
    except msgspec.DecodeError as exc:
        raise ReconcileError(f"the {subjects.CHAIN_BUCKET!r} KV bucket's 'deployment' does not decode: {exc}") from None
    if spec:
        try:
            raw = dict(item.strip().split("=", 1) for item in spec.split(",") if item.strip())
            deployment = ch.Deployment.from_dict(raw)
        except (ValueError, KeyError) as exc:
            raise ReconcileError(
                f"--deployment {spec!r}: expected token=0x...,staking=0x...,payment=0x... ({exc})"
            ) from None
        chain_id = 0
    elif stored is not None:
        deployment = ch.Deployment.from_dict(stored.addresses())
        chain_id = stored.chain_id
    else:
        raise ReconcileError(
            f"no deployment: the {subjects.CHAIN_BUCKET!r} KV bucket has no 'deployment' key "
            "(has a chain-indexer run against this NATS?) and --deployment was not given"
        )
    url = chain_url or (stored.url if stored is not None else "")
    if not url:
        raise ReconcileError("no chain URL: give --chain-url (the chain bucket names none)")
    if url == ch.EMBEDDED_URL:
        raise ReconcileError(
            f"the chain is the embedded one ({ch.EMBEDDED_URL}): it lives inside the chain-indexer's process and "
            "cannot be reached from outside it. Run the chain-indexer against a JSON-RPC chain "
            "(STIPPLE_CHAIN_URL=http://..., anvil for instance; `stipple up` serves its chain so) to reconcile."
        )
    return Target(url=url, deployment=deployment, chain_id=chain_id)


def _resolve(args: argparse.Namespace) -> None:
    """Fill in the NATS and chain URLs not given: the environment's, else the running `stipple up`'s
    (its chain only with its NATS: another network's chain would compare the wrong things)."""
    network = None
    if not args.nats_url and not os.environ.get("STIPPLE_NATS_URL"):
        network = state.read("stipple chain reconcile")
    args.nats_url = (
        args.nats_url or os.environ.get("STIPPLE_NATS_URL") or (network.nats_url if network else DEFAULT_NATS_URL)
    )
    args.chain_url = args.chain_url or os.environ.get("STIPPLE_CHAIN_URL") or (network.chain_url if network else "")


async def run(args: argparse.Namespace, out: Any = None) -> int:
    """`stipple chain reconcile` with parsed `args`; prints to `out` (stdout); returns the exit status."""
    out = out or sys.stdout
    _resolve(args)
    nc = await connect("stipple chain reconcile", args.nats_url, args.nats_ca_file)
    if nc is None:
        return 2
    try:
        js = nc.jetstream()
        target = await _target(js, args.chain_url, args.deployment)
        w3 = await asyncio.to_thread(ch.connect, target.url)
        chain_id = await asyncio.to_thread(lambda: int(w3.eth.chain_id))
        if target.chain_id and chain_id != target.chain_id:
            raise ReconcileError(
                f"--chain-url {target.url!r} is chain {chain_id}, but the indexer's deployment is on chain "
                f"{target.chain_id}"
            )
        chain = ch.StippleChain(w3, target.deployment)
        print(f"reconciling chain {chain_id} at {redact(target.url)} ({_deployment_text(target.deployment)})", file=out)
        report = await reconcile(js, chain, grace_s=args.grace_s)
    except (ReconcileError, ch.ChainError) as exc:
        print(f"stipple chain reconcile: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the chain node went away mid-way (requests' errors are OSErrors)
        where = args.chain_url or "the URL in the chain bucket"
        print(f"stipple chain reconcile: the chain at {where} failed mid-way: {exc}", file=sys.stderr)
        return 2
    finally:
        await nc.close()
    for difference in report.differences:
        print(difference.line(), file=out)
    print(report.summary(), file=out)
    return 0 if report.agree else 1


def _deployment_text(deployment: ch.Deployment) -> str:
    return ", ".join(f"{k}={v}" for k, v in deployment.to_dict().items())


def main(argv: Sequence[str]) -> int:
    """`stipple chain ...` with the words after `chain`; returns the exit status."""
    args = parser().parse_args(list(argv))
    return asyncio.run(run(args))


__all__ = ["Difference", "Report", "Snapshot", "compare", "read_snapshot", "reconcile"]

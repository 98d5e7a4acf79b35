"""`stipple chain reconcile` against anvil and a chain-indexer that ran on it: the
projections agree with the chain after paid tasks went through, and each thing broken on
purpose is reported with both values: a `stakes` entry overwritten by hand (its stake, its
operator, a key that is no node id), stakes changed on chain while the indexer was stopped
(one staked by an operator), an outcome never settled, a settlement event the chain does
not hold. The command exits 0, 1, or 2 when it cannot compare at all."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import KeyValueConfig

from stipple_cli import reconcile as rc
from stipple_common import bus, records, subjects
from stipple_common import chain as ch
from stipple_common.identity import node_id_of
from stipple_common.messages import (
    ChainLog,
    TaskAborted,
    TaskSubmitted,
    TaskSucceeded,
)
from stipple_common.taskspec import parse_task
from stipple_testkit.chain import IndexedChain

pytestmark = pytest.mark.integration

MIN_STAKE = 1_000
SPEC = parse_task({"base_model": "tiny-sd", "prompt": "p", "task_config": {"seed": 1}})


class Network(IndexedChain):
    """A fresh deployment on anvil (nodes a, b, c staked; d announced only; `operator`
    to stake for d later), a nats-server, and the chain-indexer run in-process."""

    async def indexed(self, stakes: int, settled: int, refunded: int) -> None:
        """Wait until the follower has put `stakes` entries in the bucket and the
        settlement events in the CHAIN stream."""

        async def done() -> bool:
            kv = await self.js.key_value(subjects.STAKES_BUCKET)
            keys = await records.keys(kv)
            counts = [
                len(await bus.read_messages(self.js, subjects.CHAIN_STREAM, f"chain.TaskPayment.{name}"))
                for name in ("Settled", "Refunded")
            ]
            return len(keys) >= stakes and counts == [settled, refunded]

        await self.until(f"{stakes} stakes, {settled} settled, {refunded} refunded indexed", done)

    async def reconcile(self, grace_s: float = 0.0) -> rc.Report:
        return await rc.reconcile(self.js, self.chain, grace_s=grace_s)

    async def cli(self, *args: str) -> tuple[int, str]:
        """`python -m stipple_cli chain reconcile` as a process; (exit status, stdout)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "stipple_cli",
            "chain",
            "reconcile",
            "--nats-url",
            self.nats_url,
            "--grace-s",
            "0",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        assert process.returncode != 2, err.decode()
        return process.returncode, out.decode()


@pytest.fixture
async def network(fresh_nats_url: str, anvil: ch.Anvil) -> AsyncIterator[Network]:
    net = Network(fresh_nats_url, anvil.url, nodes_named="abcd", staked="abc")
    await net.setup()
    await net.start()
    yield net
    await net.close()


def submitted(task_id: str, fee: int) -> TaskSubmitted:
    return TaskSubmitted(task_id=task_id, spec=SPEC, submitted_at=time.time(), fee=fee)


def succeeded(network: Network, task_id: str) -> TaskSucceeded:
    a, b, c = (network.ids[n] for n in "abc")
    return TaskSucceeded(
        task_id=task_id,
        reason="unanimous",
        images=[],
        verdicts=dict.fromkeys((a, b, c), "agree"),
        qos={a: 10, b: 5, c: 2},
    )


async def test_all_agree_after_paid_tasks_then_a_wrong_stake_entry_is_reported(network: Network):
    paid, aborted, free = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    await network.publish(submitted(paid, 1_700), "submitted")
    await network.publish(submitted(aborted, 300), "submitted")
    await network.publish(submitted(free, 0), "submitted")
    await network.publish(succeeded(network, paid), "succeeded")
    await network.publish(TaskAborted(task_id=aborted, reason="no_agreement"), "aborted")
    await network.publish(succeeded(network, free), "succeeded")
    await network.until("paid task settled", lambda: _is(network.state(paid), ch.TaskState.SETTLED))
    await network.until("aborted task refunded", lambda: _is(network.state(aborted), ch.TaskState.REFUNDED))
    await network.indexed(stakes=3, settled=1, refunded=1)

    report = await network.reconcile()
    assert report.differences == []
    assert (report.stakes_checked, report.tasks_checked, report.events_checked) == (4, 2, 2)  # d: announced only
    status, out = await network.cli()
    assert status == 0, out
    assert "all agree: 4 stakes, 2 paid tasks, 2 settlement events checked" in out

    a = network.ids["a"]
    stakes = await network.js.key_value(subjects.STAKES_BUCKET)
    await stakes.put(a, json.dumps({"stake": 1, "leaving": False, "block": 5}).encode())
    report = await network.reconcile()
    (wrong,) = report.differences
    assert wrong == rc.Difference(
        kind="stake",
        thing=f"node {a}",
        projection="stake=1 leaving=no owner=self (block 5)",
        chain=f"stake={MIN_STAKE} leaving=no owner=self",
        note=f"wrong at block {report.cursor}, the indexer's cursor, which is the chain head",
    )
    status, out = await network.cli()
    assert status == 1
    assert wrong.line() in out.splitlines()
    assert "1 differences" in out

    # the right stake under another operator; and an entry under a checksummed address
    stranger = node_id_of(network.operator)
    entry = {"stake": MIN_STAKE, "leaving": False, "owner": stranger, "block": 5}
    await stakes.put(a, json.dumps(entry).encode())
    await stakes.put(network.nodes["b"], json.dumps({"stake": MIN_STAKE}).encode())
    key, owner = (await network.reconcile()).differences
    assert (owner.thing, owner.projection, owner.chain) == (
        f"node {a}",
        f"stake={MIN_STAKE} leaving=no owner={stranger} (block 5)",
        f"stake={MIN_STAKE} leaving=no owner=self",
    )
    assert (key.thing, key.chain) == (f"stakes key {network.nodes['b']!r}", "-")
    assert key.note.startswith("not a node id")


async def test_what_the_stopped_indexer_missed_is_reported_until_it_catches_up(network: Network):
    task_id = uuid.uuid4().hex
    await network.publish(submitted(task_id, 1_500), "submitted")
    await network.until("escrowed", lambda: _is(network.state(task_id), ch.TaskState.ESCROWED))
    await network.indexed(stakes=3, settled=0, refunded=0)
    assert (await network.reconcile()).differences == []  # escrowed and not ended: as it should be
    await network.halt()
    cursor = (await network.reconcile()).cursor
    stakes = await network.js.key_value(subjects.STAKES_BUCKET)
    ids = network.ids
    b_block = json.loads((await stakes.get(ids["b"])).value or b"{}")["block"]

    n = network.nodes
    await network.on_chain(lambda c: c.slash(network.admin, n["b"], 400, "by-hand"))
    await network.on_chain(lambda c: c.request_unstake(n["c"]))
    await network.on_chain(lambda c: c.stake_for(network.operator, n["d"], MIN_STAKE))  # d's operator pays
    await network.publish(succeeded(network, task_id), "succeeded")
    block = await network.on_chain(lambda c: int(c.w3.eth.block_number))
    forged = ChainLog(  # a settlement event the chain never emitted (a bug, or a reorg nobody saw)
        contract="TaskPayment",
        event="Refunded",
        args={"taskId": "0x" + ch.task_key(task_id).hex(), "app": network.admin, "fee": 1_500},
        block_number=block,
        block_hash="0x" + "ab" * 32,
        log_index=0,
        tx_hash="0x" + "cd" * 32,
    )
    await bus.publish(network.js, "chain.TaskPayment.Refunded", forged, msg_id="forged")

    report = await network.reconcile()
    behind = f"changed on chain after block {cursor}, the indexer's cursor: it is behind or stopped"
    assert report.cursor == cursor
    by_thing = {d.thing: d for d in report.differences}
    assert by_thing.pop(f"node {ids['b']}") == rc.Difference(
        kind="stake",
        thing=f"node {ids['b']}",
        projection=f"stake={MIN_STAKE} leaving=no owner=self (block {b_block})",
        chain=f"stake={MIN_STAKE - 400} leaving=no owner=self",
        note=behind,
    )
    leaving = by_thing.pop(f"node {ids['c']}")
    assert (leaving.projection.split(" (")[0], leaving.chain, leaving.note) == (
        f"stake={MIN_STAKE} leaving=no owner=self",
        f"stake={MIN_STAKE} leaving=yes owner=self",
        behind,
    )
    joined = by_thing.pop(f"node {ids['d']}")
    operator = node_id_of(network.operator)
    assert (joined.projection, joined.chain, joined.note) == (
        "none",
        f"stake={MIN_STAKE} leaving=no owner={operator}",
        behind,
    )
    unsettled = by_thing.pop(f"task {task_id}")
    assert (unsettled.kind, unsettled.projection) == ("task", "succeeded (fee 1500) -> SETTLED")
    assert unsettled.chain == f"ESCROWED fee=1500 app={network.admin}"
    (event,) = by_thing.values()
    assert event.kind == "chain_event"
    assert event.thing == f"chain.TaskPayment.Refunded of task {task_id} (block {block}, tx {forged.tx_hash})"
    assert (event.projection, event.chain) == (f"REFUNDED fee=1500 app={network.admin}", unsettled.chain)

    graced = await network.reconcile(grace_s=60)  # a fresh outcome may just not be settled yet
    assert graced.pending == 1
    assert f"task {task_id}" not in {d.thing for d in graced.differences}
    assert len(graced.differences) == 4

    status, out = await network.cli()
    assert status == 1
    if not {d.line() for d in report.differences} <= set(out.splitlines()):  # once in CI: say what differed
        again = await network.reconcile()
        raise AssertionError(
            "the CLI printed:\n"
            + out
            + "\nthe report before it:\n"
            + "\n".join(d.line() for d in report.differences)
            + "\nand a report right after it:\n"
            + "\n".join(d.line() for d in again.differences)
        )

    await network.start()  # it catches up: stakes indexed, the task settled; the forged event stays
    await network.until("settled", lambda: _is(network.state(task_id), ch.TaskState.SETTLED))
    await network.indexed(stakes=4, settled=1, refunded=1)
    await network.until("stakes caught up", lambda: _only_event_left(network))
    (left,) = (await network.reconcile()).differences
    assert left.kind == "chain_event"
    assert left.chain == f"SETTLED fee=1500 app={network.admin}"


async def _is(state: Any, want: ch.TaskState) -> bool:
    return await state == want


async def _only_event_left(network: Network) -> bool:
    differences = (await network.reconcile()).differences
    return [d.kind for d in differences] == ["chain_event"]


def test_the_embedded_chain_and_a_bad_deployment_cannot_be_reconciled(
    fresh_nats_url: str, capsys: pytest.CaptureFixture[str]
):
    async def put_deployment() -> None:
        nc = await nats.connect(fresh_nats_url)
        kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket=subjects.CHAIN_BUCKET, history=1))
        zero = "0x" + "00" * 19 + "01"
        deployment = {"chain_id": 1, "url": ch.EMBEDDED_URL, "token": zero, "staking": zero, "payment": zero}
        await kv.put("deployment", json.dumps(deployment).encode())
        await nc.close()

    asyncio.run(put_deployment())
    assert rc.main(["reconcile", "--nats-url", fresh_nats_url]) == 2
    assert "cannot be reached from outside" in capsys.readouterr().err
    assert rc.main(["reconcile", "--nats-url", fresh_nats_url, "--deployment", "token=0x1"]) == 2
    assert "--deployment 'token=0x1'" in capsys.readouterr().err


def test_a_missing_ca_file_or_a_silent_nats_is_exit_2_without_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    missing = tmp_path / "ca.pem"
    assert rc.main(["reconcile", "--nats-url", "tls://127.0.0.1:1", "--nats-ca-file", str(missing)]) == 2
    assert f"STIPPLE_NATS_CA_FILE={str(missing)!r}: no such file" in capsys.readouterr().err
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert rc.main(["reconcile", "--nats-url", f"nats://ops:pw-secret@127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"NATS at 'nats://ops:***@127.0.0.1:{port}' does not answer" in err
    assert "pw-secret" not in err

"""`stipple up`'s chain (devchain.py) reached from outside: over JSON-RPC it answers as the
in-process EVM does (reverts with their custom errors), and `stipple chain reconcile` compares
a chain-indexer's projections with it: with flags, or from the state file alone."""

from __future__ import annotations

import asyncio
import io
import os
import time
from contextlib import redirect_stderr, redirect_stdout

import nats
import pytest
from eth_account import Account

from stipple_cli import state
from stipple_cli.__main__ import main
from stipple_cli.devchain import DevChain
from stipple_common import chain as ch
from stipple_common import records, subjects
from stipple_common.identity import node_id_of
from stipple_testkit.network import Network

pytestmark = pytest.mark.integration

MIN_STAKE = 100 * 10**18


@pytest.fixture
def devchain():
    """What `stipple up` starts for the chain: the contracts deployed, a node's key funded (and
    staked here, as the node would through the relay), served on a free loopback port."""
    chain = DevChain(block_s=0.2).create()
    chain.deploy(min_stake=MIN_STAKE)
    node = Account.create()
    chain.fund([node.address], MIN_STAKE)
    ch.StippleChain(chain.w3, chain.deployment).stake(node, MIN_STAKE)
    chain.node = node  # type: ignore[attr-defined]
    chain.start()
    yield chain
    chain.stop()


def test_the_chain_answers_over_json_rpc_as_in_process(devchain):
    w3 = ch.connect(devchain.url)
    chain = ch.StippleChain(w3, devchain.deployment)
    node = devchain.node
    assert chain.stake_of(node.address) == MIN_STAKE
    assert chain.minimum_stake() == MIN_STAKE
    assert w3.eth.get_balance(node.address) > 0  # gas money left for its own transactions
    with pytest.raises(ch.ContractReverted) as refused:  # a custom error, decoded from the revert data
        chain.slash(node, node.address, 1, "task-1")
    assert refused.value.error == "AccessControlUnauthorizedAccount"
    assert refused.value.args_by_name["account"] == node.address
    start = w3.eth.block_number
    while w3.eth.block_number < start + 2:  # blocks come without transactions, as on a real chain
        time.sleep(0.05)


def _reconcile(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(["chain", "reconcile", *argv])
        except SystemExit as exc:
            return int(exc.code or 0), out.getvalue(), err.getvalue()
    raise AssertionError("main() returns only by SystemExit")


async def test_reconcile_compares_an_indexer_with_stipple_ups_chain(devchain, fresh_nats_url):
    node_id = node_id_of(devchain.node.address)
    async with Network.plain(fresh_nats_url) as net:
        d = devchain.deployment
        await net.chain_indexer(
            chain_url=devchain.url,
            deployment=f"token={d.token},staking={d.staking},payment={d.payment}",
            account=devchain.account,
            poll_s=0.1,
        )
        nc = await nats.connect(fresh_nats_url)
        try:
            js = nc.jetstream()
            stakes = None
            while stakes is None:  # the indexer's projection of the stake (its confirmations: blocks of 0.2 s)
                await asyncio.sleep(0.1)
                try:
                    kv = await js.key_value(subjects.STAKES_BUCKET)
                    stakes = await records.get(kv, node_id, records.indexed_stake_decoder)
                except nats.js.errors.BucketNotFoundError:
                    continue
            assert stakes.stake == MIN_STAKE

            # with a flag: the chain's URL is the one the indexer put in the chain bucket, the devchain's
            status, out, err = await asyncio.to_thread(_reconcile, ["--nats-url", fresh_nats_url])
            assert status == 0, err
            assert f"at {devchain.url}" in out
            assert "all agree: 1 stakes" in out

            # without flags: the state file of the running `stipple up` (this process)
            state.write(
                state.NetworkState(
                    pid=os.getpid(),
                    started_at=time.time(),
                    data_dir="/nonexistent",
                    gateway_url="http://127.0.0.1:1",
                    nats_url=fresh_nats_url,
                    nats_server=fresh_nats_url,
                    chain_url=devchain.url,
                )
            )
            status, out, err = await asyncio.to_thread(_reconcile, [])
            assert status == 0, err
            assert "all agree: 1 stakes" in out

            # a projection that is wrong: reconcile names the node, both values, and exits 1
            await records.put(kv, node_id, records.IndexedStake(stake=1, block=stakes.block))
            status, out, err = await asyncio.to_thread(_reconcile, [])
            assert status == 1, err
            assert f"stake       node {node_id}: projection stake=1 " in out
            assert f"chain stake={MIN_STAKE} " in out
        finally:
            await nc.close()


# `stipple up` as a process: eight interpreters start (torch in each node), then the nodes
# stake; on this 2-core machine that takes 60-90 s, hence slow and five minutes.
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stipple_up_writes_its_state_which_every_command_finds(tmp_path, state_file):
    import json
    import signal
    import subprocess
    import sys

    def stipple(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "stipple_cli", *argv], capture_output=True, text=True, timeout=120)

    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen(
        [sys.executable, "-m", "stipple_cli", "up", "--port", "0", "--no-demo", "--data-dir", str(tmp_path / "data")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        while not state_file.exists():  # written once the network is up
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            time.sleep(0.5)
        written = json.loads(state_file.read_text())
        assert written["pid"] == up.pid
        assert written["data_dir"] == str((tmp_path / "data").resolve())
        assert written["chain_url"].startswith("http://127.0.0.1:")
        assert "validator:" in written["nats_url"]  # a control-plane user: the server has authentication on
        assert state_file.stat().st_mode & 0o777 == 0o600

        listed = stipple("nodes")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines()[-1] == "3 live of 3"
        assert " 100 " in listed.stdout  # each node staked the minimum (100 tokens) on the chain

        image = tmp_path / "x.png"
        made = stipple("generate", "a fox", "--width", "64", "--height", "64", "--steps", "2", "--output", str(image))
        assert made.returncode == 0, made.stderr
        assert image.read_bytes().startswith(b"\x89PNG")

        reconciled = stipple("chain", "reconcile")
        assert reconciled.returncode == 0, reconciled.stderr
        assert f"at {written['chain_url']}" in reconciled.stdout
        assert "all agree: 3 stakes" in reconciled.stdout

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        assert not state_file.exists()  # removed on a clean shutdown
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=60)
        log.close()

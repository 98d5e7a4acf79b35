"""The gatekeeper on a real nats-server with authentication on: who gets in, as what.

Each test starts a secured server (stipple_common.natsserver.start_secured: accounts,
the services' users, the auth callout) and the gatekeeper's real `serve`, then connects
clients the way nodes do (their address as the token, the server's nonce signed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

import msgspec
import nats
import nats.errors
import pytest
from eth_account import Account

from stipple_common import subjects
from stipple_common.identity import node_id_of
from stipple_common.messages import Ban, IndexedStake, JoinStatus, join_status_decoder
from stipple_common.natsserver import NatsServer, NetworkCredentials, start_secured
from stipple_common.service import nats_identity, open_service
from stipple_gatekeeper.service import GatekeeperSettings, serve

pytestmark = [pytest.mark.integration]

MIN_STAKE = 100


@dataclass
class Network:
    server: NatsServer
    credentials: NetworkCredentials
    admin: nats.NATS  # a control-plane client (the validator's user)
    stop: asyncio.Event

    async def connect_node(self, account=None, **options):
        account = account or Account.create()
        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        options = {"max_reconnect_attempts": 0, **options}
        nc = await nats.connect(
            self.server.url, **{**nats_identity(account), **options}, error_cb=on_error, connect_timeout=2
        )
        nc.errors = errors  # type: ignore[attr-defined]
        return account, nc

    async def set_stake(self, node_id: str, stake: int, *, leaving: bool = False) -> None:
        kv = await self.admin.jetstream().key_value(subjects.STAKES_BUCKET)
        await kv.put(node_id, msgspec.json.encode(IndexedStake(stake=stake, leaving=leaving)))


@pytest.fixture
async def network(tmp_path) -> AsyncIterator[Network]:
    server, credentials = start_secured(tmp_path / "nats")
    stop = asyncio.Event()
    try:
        async with AsyncExitStack() as stack:
            settings = GatekeeperSettings(
                nats_url=credentials.service_url(server.url, "gatekeeper"),
                issuer_seed=credentials.issuer_seed,
                callout_seed=credentials.callout_seed,
                system_url=credentials.system_url(server.url),
                min_stake=MIN_STAKE,
                reconcile_s=1.0,
            )
            ctx = await stack.enter_async_context(open_service("gatekeeper", settings, blobs=True, stop=stop))
            task = asyncio.create_task(serve(ctx, settings))
            admin = await nats.connect(credentials.service_url(server.url, "validator"))
            stack.push_async_callback(admin.drain)
            await asyncio.sleep(0.3)
            yield Network(server, credentials, admin, stop)
            stop.set()
            await task
    finally:
        server.stop()


async def ask_join(nc, node_id: str) -> JoinStatus:
    msg = await nc.request(subjects.join_rpc_subject(node_id), b"", timeout=2)
    return join_status_decoder.decode(msg.data)


async def test_a_client_without_a_key_cannot_connect(network):
    with pytest.raises(nats.errors.Error):
        await nats.connect(network.server.url, allow_reconnect=False, connect_timeout=2)
    with pytest.raises(nats.errors.Error):
        await nats.connect(network.server.url, token="0x" + "ab" * 20, allow_reconnect=False, connect_timeout=2)


async def test_a_signature_by_another_key_is_refused(network):
    victim = Account.create()
    forger = Account.create()
    options = nats_identity(forger)
    options["token"] = node_id_of(victim.address)  # claims the victim's address, signs with its own key
    with pytest.raises(nats.errors.Error):
        await nats.connect(network.server.url, **options, allow_reconnect=False, connect_timeout=2)


async def test_a_key_without_stake_is_only_an_applicant_and_is_told_why(network):
    account, nc = await network.connect_node()
    node_id = node_id_of(account.address)
    try:
        status = await ask_join(nc, node_id)
        assert (status.level, status.reason, status.min_stake) == ("applicant", "no_stake", MIN_STAKE)
        # it reaches nothing of the network: not its own task subjects, not the streams
        await nc.publish(subjects.task_subject("t1", "started", node_id), b"{}")
        await nc.publish(subjects.node_subject(node_id, "joined"), b"{}")
        await nc.subscribe("tasks.>")
        await nc.flush(timeout=1)
        await asyncio.sleep(0.2)
        refused = " ".join(str(e).lower() for e in nc.errors)
        assert 'publish to "tasks.t1.started' in refused
        assert f'publish to "nodes.{node_id}.joined"' in refused
        assert 'subscription to "tasks.>"' in refused
    finally:
        await nc.close()


async def test_a_staked_key_is_a_node_on_its_own_subjects_only(network):
    account = Account.create()
    node_id = node_id_of(account.address)
    await network.set_stake(node_id, MIN_STAKE)
    await asyncio.sleep(0.2)
    _, nc = await network.connect_node(account)
    try:
        assert (await ask_join(nc, node_id)).level == "node"
        js = nc.jetstream()
        info = await js.consumer_info(subjects.WORK_STREAM, subjects.node_durable(node_id))  # made for it
        assert info.config.filter_subject == subjects.work_subject(node_id)
        other = node_id_of(Account.create().address)
        for subject in (
            subjects.task_subject("t1", "succeeded"),  # a control-plane event
            subjects.task_subject("t1", "committed", other),  # another node's
            subjects.node_subject(node_id, "qos"),  # QoS comes from the validator
            subjects.node_subject(other, "joined"),
            subjects.chain_rpc_subject("gateway"),  # fee reservations
            f"$JS.API.CONSUMER.CREATE.{subjects.WORK_STREAM}",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{subjects.WORK_STREAM}.{subjects.node_durable(node_id)}",
        ):
            nc.errors.clear()
            await nc.publish(subject, b"{}")
            await nc.flush(timeout=1)
            await asyncio.sleep(0.05)
            assert any("permissions violation" in str(e).lower() for e in nc.errors), subject
        nc.errors.clear()
        await nc.publish(subjects.node_subject(node_id, "heartbeat"), b"{}")  # its own: allowed
        await nc.flush(timeout=1)
        await asyncio.sleep(0.05)
        assert nc.errors == []
    finally:
        await nc.close()


async def downgraded(network: Network, account, change) -> JoinStatus:
    """Connect a staked node, apply `change`, and return how its connection was admitted
    after the gatekeeper closed it and the client reconnected by itself."""
    node_id = node_id_of(account.address)
    await network.set_stake(node_id, MIN_STAKE)
    await asyncio.sleep(0.2)
    reconnected = asyncio.Event()

    async def on_reconnected() -> None:
        reconnected.set()

    _, nc = await network.connect_node(account, reconnected_cb=on_reconnected, max_reconnect_attempts=5)
    try:
        assert (await ask_join(nc, node_id)).level == "node"
        await change(node_id)
        await asyncio.wait_for(reconnected.wait(), 5)  # closed by the gatekeeper, back at once
        return await ask_join(nc, node_id)
    finally:
        await nc.close()


async def test_a_banned_node_is_disconnected_and_comes_back_as_an_applicant(network):
    async def ban(node_id: str) -> None:
        bans = await network.admin.jetstream().create_key_value(bucket=subjects.BANS_BUCKET)
        record = Ban(reason="not_assigned", detail="flooded", until=time.time() + 3600, at=time.time())
        await bans.put(node_id, msgspec.json.encode(record))

    status = await downgraded(network, Account.create(), ban)
    assert (status.level, status.reason) == ("applicant", "banned")
    assert "flooded" in status.detail
    await asyncio.sleep(3.0)  # a reconcile round too: only the banned node's connections are closed
    account, other = await network.connect_node()
    try:
        assert (await ask_join(other, node_id_of(account.address))).level == "applicant"  # the callout still answers
    finally:
        await other.close()


async def test_a_node_whose_stake_is_slashed_below_the_minimum_is_disconnected(network):
    async def slash(node_id: str) -> None:
        await network.set_stake(node_id, MIN_STAKE - 1)

    status = await downgraded(network, Account.create(), slash)
    assert (status.level, status.reason) == ("applicant", "below_minimum")


async def test_a_leaving_node_is_disconnected(network):
    async def leave(node_id: str) -> None:
        await network.set_stake(node_id, MIN_STAKE, leaving=True)

    status = await downgraded(network, Account.create(), leave)
    assert (status.level, status.reason) == ("applicant", "leaving")

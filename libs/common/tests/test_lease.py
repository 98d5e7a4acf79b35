"""The service lease (lease.py) on a real nats-server: one holder at a time, renewals keep
it, a crashed holder's lease is taken after its ttl, the same instance name takes its own
back at once, a holder whose key another instance took sees it lost, and bad settings are
refused naming the variable."""

import asyncio
import uuid

import msgspec
import pytest
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyNotFoundError

from stipple_common.lease import Lease, LeaseLost, LeaseRecord, PartitionLeases, open_leases
from stipple_common.natsserver import NatsServer
from stipple_common.service import open_service, serve_as_leader
from stipple_common.settings import CommonSettings, InvalidSettings, load_settings
from stipple_common.subjects import LEASES_BUCKET

pytestmark = pytest.mark.integration

TTL = 1.0  # renewals every 1/3 s: room for a loaded machine's stalls


@pytest.fixture
async def kv(nc):
    return await open_leases(nc.jetstream())


def service_name():
    return f"svc-{uuid.uuid4().hex[:8]}"  # the nats-server is the session's: a key of this test's own


async def record_of(kv, name):
    entry = await kv.get(name)
    return msgspec.json.decode(entry.value, type=LeaseRecord), entry.revision


async def held_by(kv, name, holder):
    try:
        return (await record_of(kv, name))[0].holder == holder
    except KeyNotFoundError:
        return False


async def test_the_first_instance_acquires_and_its_record_names_it(kv):
    name = service_name()
    a = Lease(kv, name, "a", ttl_s=TTL)
    assert await a.try_acquire() == 0.0
    assert a.held
    record, revision = await record_of(kv, name)
    assert record.holder == "a"
    assert a.revision == revision  # the fencing token is the key's revision


async def test_a_second_instance_waits_while_the_holder_renews(kv):
    name = service_name()
    a, b = Lease(kv, name, "a", ttl_s=TTL), Lease(kv, name, "b", ttl_s=TTL)
    assert await a.acquire()
    first = a.revision
    keeper = asyncio.create_task(a.keep())
    stop = asyncio.Event()
    standby = asyncio.create_task(b.acquire(stop))
    await asyncio.sleep(TTL * 3)  # three ttls: only renewals can have kept it
    assert not standby.done()
    assert not b.held
    assert a.held
    assert a.revision > first
    assert (await record_of(kv, name))[0].holder == "a"
    stop.set()
    assert await standby is False
    keeper.cancel()


async def test_a_crashed_holder_is_taken_over_after_its_ttl(kv):
    name = service_name()
    a, b = Lease(kv, name, "a", ttl_s=TTL), Lease(kv, name, "b", ttl_s=TTL)
    assert await a.acquire()
    keeper = asyncio.create_task(a.keep())
    await asyncio.sleep(TTL / 2)
    keeper.cancel()  # as a SIGKILL: no release
    assert await asyncio.wait_for(b.acquire(), 10)
    assert (await record_of(kv, name))[0].holder == "b"
    with pytest.raises(LeaseLost, match="lost"):
        await a.renew()  # had it come back, it would find its lease gone
    assert a.lost.is_set()
    assert not a.held


async def test_the_same_instance_name_takes_its_lease_back_at_once(kv):
    name = service_name()
    before = Lease(kv, name, "dispatcher-0", ttl_s=60)  # a long ttl: waiting it out would show
    assert await before.try_acquire() == 0.0
    other = Lease(kv, name, "dispatcher-1", ttl_s=60)
    assert await other.try_acquire() > 0  # another instance must wait
    restarted = Lease(kv, name, "dispatcher-0", ttl_s=60)  # the process restarted, same name
    assert await restarted.try_acquire() == 0.0
    assert restarted.revision > before.revision
    with pytest.raises(LeaseLost, match="taken"):
        await before.renew()


async def test_a_holder_whose_key_another_instance_took_sees_it_lost(kv):
    name = service_name()
    a = Lease(kv, name, "a", ttl_s=TTL)
    assert await a.acquire()
    keeper = asyncio.create_task(a.keep())
    stolen = msgspec.json.encode(LeaseRecord(holder="b", expires_at=1e12))
    for _ in range(50):  # a CAS of another instance (say its clock ran ahead), between two renewals
        _, revision = await record_of(kv, name)
        try:
            await kv.update(name, stolen, last=revision)
            break
        except BadRequestError:  # the holder renewed since the read: read again
            continue
    else:
        raise AssertionError("the key could not be taken between renewals")
    with pytest.raises(LeaseLost, match="taken"):
        await asyncio.wait_for(keeper, 10)
    assert a.lost.is_set()
    assert not a.held
    assert a.revision == 0
    assert (await record_of(kv, name))[0].holder == "b"  # the loser does not write again


async def test_a_released_lease_is_taken_at_once(kv):
    name = service_name()
    a, b = Lease(kv, name, "a", ttl_s=60), Lease(kv, name, "b", ttl_s=60)
    assert await a.acquire()
    await a.release()
    assert await b.try_acquire() == 0.0  # over the tombstone, without waiting 60 s
    assert (await record_of(kv, name))[0].holder == "b"


async def test_a_holder_that_cannot_reach_the_kv_loses_its_lease_at_its_expiry(tmp_path):
    import nats

    server = NatsServer.start(tmp_path / "nats")
    client = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        kv = await open_leases(client.jetstream())
        a = Lease(kv, "dispatcher", "a", ttl_s=TTL)
        assert await a.acquire()
        keeper = asyncio.create_task(a.keep())
        server.stop()  # the KV is gone: renewals are retried until the local expiry, then it is lost
        with pytest.raises(LeaseLost, match="kv_unavailable|expired"):
            await asyncio.wait_for(keeper, 10)
        assert not a.held
    finally:
        await client.close()


async def test_serve_as_leader_stops_the_service_and_raises_when_its_lease_is_lost(fresh_nats_url):
    settings = CommonSettings(nats_url=fresh_nats_url, lease_s=TTL, instance="a")
    served = asyncio.Event()

    async def serve(ctx, _settings):
        served.set()
        await ctx.stop.wait()

    stop = asyncio.Event()
    async with open_service("leased", settings, stop=stop) as ctx:
        leader = asyncio.create_task(serve_as_leader(ctx, "leased", settings, serve))
        await asyncio.wait_for(served.wait(), 10)
        kv = await open_leases(ctx.js)
        _, revision = await record_of(kv, "leased")
        await kv.update("leased", msgspec.json.encode(LeaseRecord(holder="b", expires_at=1e12)), last=revision)
        with pytest.raises(LeaseLost):
            await asyncio.wait_for(leader, 10)
        assert stop.is_set()  # the service was asked to stop: its consumers end


async def test_serve_as_leader_gives_the_lease_back_at_a_graceful_stop(fresh_nats_url):
    settings = CommonSettings(nats_url=fresh_nats_url, lease_s=60, instance="a")
    serving = asyncio.Event()

    async def serve(ctx, _settings):
        serving.set()
        await ctx.stop.wait()

    stop = asyncio.Event()
    async with open_service("leased", settings, stop=stop) as ctx:
        leader = asyncio.create_task(serve_as_leader(ctx, "leased", settings, serve))
        kv = await open_leases(ctx.js)
        b = Lease(kv, "leased", "b", ttl_s=60)
        await asyncio.wait_for(serving.wait(), 10)
        assert await held_by(kv, "leased", "a")
        assert await b.try_acquire() > 0
        stop.set()
        await asyncio.wait_for(leader, 10)
        assert await b.try_acquire() == 0.0  # at once, not after 60 s


def test_bad_lease_settings_are_refused_naming_the_variable():
    with pytest.raises(InvalidSettings, match="STIPPLE_LEASE_S='-1'"):
        load_settings(CommonSettings, {"STIPPLE_LEASE_S": "-1"})
    with pytest.raises(InvalidSettings, match="STIPPLE_LEASE_S='soon'"):
        load_settings(CommonSettings, {"STIPPLE_LEASE_S": "soon"})
    with pytest.raises(InvalidSettings, match="STIPPLE_INSTANCE='a b'"):
        load_settings(CommonSettings, {"STIPPLE_INSTANCE": "a b"})
    settings = load_settings(CommonSettings, {"STIPPLE_LEASE_S": "2.5", "STIPPLE_INSTANCE": "dispatcher-0"})
    assert (settings.lease_s, settings.instance) == (2.5, "dispatcher-0")
    assert load_settings(CommonSettings, {}).lease_s == 0.0  # off unless asked for


async def test_serve_as_leader_refuses_a_negative_ttl_built_in_code():
    async def serve(ctx, _settings):
        raise AssertionError("served")

    with pytest.raises(InvalidSettings, match="STIPPLE_LEASE_S=-1"):
        await serve_as_leader(None, "leased", CommonSettings(lease_s=-1), serve)  # type: ignore[arg-type]


def test_a_lease_needs_a_positive_ttl_and_an_instance_name():
    with pytest.raises(ValueError, match="ttl_s=0"):
        Lease(None, "x", "a", ttl_s=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="instance"):
        Lease(None, "x", "", ttl_s=1)  # type: ignore[arg-type]


async def test_without_a_lease_the_service_serves_at_once_and_no_bucket_is_made(fresh_nats_url):
    settings = CommonSettings(nats_url=fresh_nats_url)  # lease_s 0: the default
    stop = asyncio.Event()

    async def serve(ctx, _settings):
        stop.set()  # served, and stops at once

    async with open_service("unleased", settings, stop=stop) as ctx:
        await asyncio.wait_for(serve_as_leader(ctx, "unleased", settings, serve), 10)
        assert stop.is_set()
        with pytest.raises(BucketNotFoundError):
            await ctx.js.key_value(LEASES_BUCKET)


class Owners:
    """Who works on which partition, from the handover callbacks: a partition is never
    worked on by two replicas at once (on_lose runs before another may take it)."""

    def __init__(self) -> None:
        self.working: dict[int, str] = {}
        self.overlaps: list[int] = []

    def callbacks(self, instance):
        async def gain(k):
            if k in self.working:
                self.overlaps.append(k)
            self.working[k] = instance

        async def lose(k):
            assert self.working.get(k) == instance
            del self.working[k]

        return gain, lose


async def rounds(replicas, owners, n=3):
    for _ in range(n):
        for r in replicas:
            await r.round(*owners.callbacks(r.instance))


async def test_partitions_are_shared_fairly_and_a_joining_replica_gets_its_share(kv):
    name, owners = service_name(), Owners()
    a = PartitionLeases(kv, name, "a", 8, ttl_s=5.0)
    await rounds([a], owners)
    assert a.held == set(range(8))  # alone: every partition
    b = PartitionLeases(kv, name, "b", 8, ttl_s=5.0)
    await rounds([a, b], owners)
    assert (len(a.held), len(b.held)) == (4, 4)
    assert a.held | b.held == set(range(8))
    assert owners.overlaps == []
    assert owners.working == {k: "a" for k in a.held} | {k: "b" for k in b.held}


async def test_three_replicas_on_four_partitions_leave_none_idle_and_none_unheld(kv):
    name, owners = service_name(), Owners()
    replicas = [PartitionLeases(kv, name, i, 4, ttl_s=5.0) for i in ("a", "b", "c")]
    await rounds(replicas[:2], owners)
    await rounds(replicas, owners, n=4)
    assert sorted(len(r.held) for r in replicas) == [1, 1, 2]
    assert set().union(*(r.held for r in replicas)) == set(range(4))
    held_before = [set(r.held) for r in replicas]
    await rounds(replicas, owners, n=3)  # stable: nothing moves any more
    assert [r.held for r in replicas] == held_before
    assert owners.overlaps == []


async def test_a_killed_replicas_partitions_are_taken_after_its_ttl_and_a_stopped_ones_at_once(kv):
    name, owners = service_name(), Owners()
    a = PartitionLeases(kv, name, "a", 6, ttl_s=TTL)
    b = PartitionLeases(kv, name, "b", 6, ttl_s=TTL)
    await rounds([a, b], owners)
    assert (len(a.held), len(b.held)) == (3, 3)
    # b is killed: no more rounds, nothing given back; a holds its own meanwhile
    for k in list(b.held):
        del owners.working[k]  # (its process is gone)
    started = asyncio.get_running_loop().time()
    while len(a.held) < 6:
        await a.round(*owners.callbacks("a"))
        await asyncio.sleep(TTL / 3)
        assert asyncio.get_running_loop().time() - started < TTL * 5, f"a holds only {sorted(a.held)}"
    assert asyncio.get_running_loop().time() - started >= TTL  # not before b's keys expired
    # a graceful stop gives every partition back at once, and its member key
    stop = asyncio.Event()
    stop.set()
    await a.run(stop, *owners.callbacks("a"))
    assert a.held == set()
    assert owners.working == {}
    c = PartitionLeases(kv, name, "c", 6, ttl_s=TTL)
    await c.round(*owners.callbacks("c"))
    assert c.held == set(range(6))
    assert owners.overlaps == []

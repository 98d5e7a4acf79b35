"""The sentinel's ban threshold when the validator is partitioned: a replica sees only its
partitions' share of a node's task events, so it bans after that share of the strikes, and
a node spreading junk over the replicas is still banned within about `strikes` in all."""

from types import SimpleNamespace

import pytest
from nats.js.api import KeyValueConfig
from prometheus_client import CollectorRegistry

from stipple_common import subjects
from stipple_common.identity import dev_node_id
from stipple_common.records import ban_decoder
from stipple_validator import sentinel as sentinel_module
from stipple_validator.metrics import SentinelMetrics
from stipple_validator.sentinel import Sentinel

pytestmark = pytest.mark.integration

STRIKES = 10


@pytest.fixture
def js(fresh_js):
    return fresh_js


async def sentinel(js):
    bans = await js.create_key_value(KeyValueConfig(bucket=subjects.BANS_BUCKET, history=1))
    return Sentinel(js, bans, SentinelMetrics(CollectorRegistry()), strikes=STRIKES, window_s=60.0, ban_s=600.0)


async def strikes_until_banned(sentinel, node, share, most=50):
    for n in range(1, most + 1):
        if await sentinel.strike(node, "unknown_task", "junk", share=share):
            return n
    return None


@pytest.mark.parametrize(("share", "banned_at"), [(1.0, STRIKES), (0.5, 5), (0.25, 3), (1 / 1024, 1)])
async def test_a_replica_bans_after_its_share_of_the_strikes(js, share, banned_at):
    assert await strikes_until_banned(await sentinel(js), dev_node_id("junk"), share) == banned_at


async def test_junk_spread_over_two_half_replicas_is_banned_within_the_strikes_in_all(js):
    first, second = await sentinel(js), await sentinel(js)
    node = dev_node_id("spreader")
    total = 0
    for replica in [first, second] * STRIKES:
        total += 1
        if await replica.strike(node, "unknown_task", "junk", share=0.5):
            break
    else:
        raise AssertionError("never banned")
    assert total <= STRIKES
    bans = await js.key_value(subjects.BANS_BUCKET)
    assert (await bans.get(node)).value  # the gatekeeper refuses it from now on


async def test_a_node_banned_again_soon_after_its_ban_ends_is_banned_twice_as_long(js, monkeypatch):
    """A node that floods again as soon as its ban ends (each flood is stored until the ban
    lands) is banned 1x, 2x, 4x ... as long, up to the cap; the count is in the KV record,
    so a validator restarted meanwhile goes on with it; a week quiet starts it again."""
    now = [1_000_000.0]
    monkeypatch.setattr(sentinel_module, "time", SimpleNamespace(time=lambda: now[0]))
    bans = await js.create_key_value(KeyValueConfig(bucket=subjects.BANS_BUCKET, history=1))
    node = dev_node_id("repeat")

    def make() -> Sentinel:
        metrics = SentinelMetrics(CollectorRegistry())
        return Sentinel(
            js, bans, metrics, strikes=STRIKES, window_s=60.0, ban_s=600.0, memory_s=86_400.0, max_ban_s=2_000.0
        )

    async def banned_for(replica: Sentinel) -> tuple[float, int]:
        assert await strikes_until_banned(replica, node, 1.0) == STRIKES
        ban = ban_decoder.decode((await bans.get(node)).value)
        now[0] = ban.until + 1.0  # the node comes back as soon as it may
        return ban.until - ban.at, ban.count

    first = make()
    assert await banned_for(first) == (600.0, 1)
    assert await banned_for(first) == (1_200.0, 2)
    assert await banned_for(make()) == (2_000.0, 3)  # a restarted validator: the cap, not 2,400
    now[0] += 86_400.0  # a day quiet past the end of the last
    assert await banned_for(make()) == (600.0, 1)


async def test_a_ban_record_from_before_the_count_reads_as_the_first(js, monkeypatch):
    now = [1_000_000.0]
    monkeypatch.setattr(sentinel_module, "time", SimpleNamespace(time=lambda: now[0]))
    bans = await js.create_key_value(KeyValueConfig(bucket=subjects.BANS_BUCKET, history=1))
    node = dev_node_id("old-record")
    await bans.put(node, b'{"reason": "not_assigned", "detail": "x", "until": 999000.0, "at": 995400.0}')
    replica = Sentinel(js, bans, SentinelMetrics(CollectorRegistry()), strikes=STRIKES, window_s=60.0, ban_s=600.0)
    assert await strikes_until_banned(replica, node, 1.0) == STRIKES
    ban = ban_decoder.decode((await bans.get(node)).value)
    assert (ban.until - ban.at, ban.count) == (1_200.0, 2)  # its last ban ended 1,000 s ago: the second
    await bans.put(node, b"not a record")
    now[0] = ban.until + 1.0
    assert await strikes_until_banned(replica, node, 1.0) == STRIKES
    assert ban_decoder.decode((await bans.get(node)).value).count == 1


async def test_a_replica_that_finds_the_node_banned_already_keeps_that_ban(js):
    """Two partitioned replicas both reach their share of a flood: the second finds the
    first's ban running and adopts it, rather than banning again as a repeat (twice as long)."""
    first, second = await sentinel(js), await sentinel(js)
    node = dev_node_id("both")
    assert await strikes_until_banned(first, node, 0.5) == STRIKES // 2
    bans = await js.key_value(subjects.BANS_BUCKET)
    before = ban_decoder.decode((await bans.get(node)).value)
    assert await strikes_until_banned(second, node, 0.5, most=STRIKES) is None  # never bans it again
    after = ban_decoder.decode((await bans.get(node)).value)
    assert after == before
    assert after.count == 1
    assert second.banned_until[node] == before.until

"""The sentinel's ban threshold when the validator is partitioned: a replica sees only its
partitions' share of a node's task events, so it bans after that share of the strikes, and
a node spreading junk over the replicas is still banned within about `strikes` in all."""

import pytest
from nats.js.api import KeyValueConfig
from prometheus_client import CollectorRegistry

from stipple_common import subjects
from stipple_common.identity import dev_node_id
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

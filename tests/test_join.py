"""Joining for real, as `stipple up` and production do, and staying joined.

A secured network (authentication on, the gatekeeper's callout) whose nodes get NATS
identities that expire after a few seconds: when one expires, the server closes the
node's connection and nats-py does not reconnect by itself; the node agent joins again
(`keep_joined`), keeps what it committed (a task in flight is revealed on the new
connection), and the network goes on.
"""

from __future__ import annotations

import asyncio

import pytest

from stipple_common.messages import TaskSucceeded
from stipple_testkit.network import Network

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = ("node-1", "node-2", "node-3")


async def test_a_node_whose_identity_expires_joins_again_and_keeps_working(tmp_path, runner) -> None:
    async with Network.secured(tmp_path / "nats") as net:
        await net.gatekeeper(node_identity_ttl_s=4)
        await net.dispatcher()
        await net.validator(phash_threshold=2)
        for name in NODES:
            await net.node(runner, name)
        await asyncio.sleep(1.0)
        first = await net.run_task(seed=1, steps=2)
        assert isinstance(first, TaskSucceeded), first
        assert set(first.verdicts.values()) == {"agree"}
        # every identity expires 4 s after its join and the server closes the connection; each
        # node joins again (how soon depends on the machine's load: up to 25 s are allowed)
        deadline = asyncio.get_running_loop().time() + 25.0
        while not all(net.nodes[name].joins >= 2 for name in NODES):
            assert asyncio.get_running_loop().time() < deadline, {n: h.joins for n, h in net.nodes.items()}
            await asyncio.sleep(0.25)
        second = await net.run_task(seed=2, steps=2)
        assert isinstance(second, TaskSucceeded), second
        assert set(second.verdicts.values()) == {"agree"}
        assert set(second.verdicts) == {net.nodes[name].node_id for name in NODES}

"""Fixtures shared by the end-to-end tests (the network itself is stipple_testkit.network)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from stipple_node.pipeline import PipelineRunner
from stipple_node.service import NodeAgent
from stipple_testkit.network import Network, tiny_runner


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> PipelineRunner:
    """The built-in tiny model, loaded once per module (bit-exact at one torch thread)."""
    return tiny_runner(Path(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
async def served(fresh_nats_url: str, runner: PipelineRunner) -> AsyncIterator[Network]:
    """The whole network in process: gatekeeper, dispatcher, validator, gateway and three node
    agents of three operators (what the gateway needs live before it takes a task)."""
    async with Network.plain(fresh_nats_url) as net:
        nodes = [(f"node-{i}", NodeAgent) for i in (1, 2, 3)]
        await net.control_plane_and_nodes(runner, nodes, validator={"phash_threshold": 2})
        await net.gateway()
        await asyncio.sleep(1.0)  # nodes announce themselves
        yield net

"""The real network for the client's tests, in process: gatekeeper, dispatcher, validator,
gateway and three node agents on the built-in tiny model (stipple_testkit.network), as
tests/conftest.py builds it (its fixtures are not visible from here)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from stipple_node.pipeline import PipelineRunner
from stipple_node.service import NodeAgent
from stipple_testkit.network import Network, tiny_runner


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> PipelineRunner:
    """The tiny model, loaded once per module."""
    return tiny_runner(Path(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
async def served(fresh_nats_url: str, tiny: PipelineRunner) -> AsyncIterator[Network]:
    """The network, once the gateway sees its three nodes live."""
    async with Network.plain(fresh_nats_url) as net:
        agents = [(f"node-{i}", NodeAgent) for i in (1, 2, 3)]
        await net.control_plane_and_nodes(tiny, agents, validator={"phash_threshold": 2})
        await net.gateway()
        async with httpx.AsyncClient(base_url=net.gateway_url) as http:
            for _ in range(200):  # nodes announce themselves
                if (await http.get("/v1/nodes")).json()["live"] == len(agents):
                    break
                await asyncio.sleep(0.05)
        yield net

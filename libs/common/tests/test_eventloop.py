"""eventloop.run: a service process runs on uvloop unless STIPPLE_EVENT_LOOP=asyncio; a
bad value is refused at start, naming the variable."""

import asyncio

import pytest
import uvloop

from stipple_common import eventloop
from stipple_common.settings import CommonSettings, InvalidSettings, load_settings


async def loop_kind() -> str:
    await asyncio.sleep(0)  # a real await on the loop
    reader, writer = await asyncio.open_connection(*await echo_server())  # sockets, as NATS uses them
    writer.write(b"ping\n")
    line = await reader.readline()
    writer.close()
    assert line == b"ping\n"
    return "uvloop" if isinstance(asyncio.get_running_loop(), uvloop.Loop) else "asyncio"


async def echo_server() -> tuple[str, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server.sockets[0].getsockname()[:2]


def test_the_default_loop_is_uvloop_and_asyncio_can_be_chosen() -> None:
    assert load_settings(CommonSettings, env={}).event_loop == "uvloop"
    assert eventloop.run(loop_kind()) == "uvloop"
    chosen = load_settings(CommonSettings, env={"STIPPLE_EVENT_LOOP": "asyncio"})
    assert eventloop.run(loop_kind(), chosen.event_loop) == "asyncio"


def test_an_unknown_loop_is_refused_naming_the_variable() -> None:
    with pytest.raises(InvalidSettings, match=r"STIPPLE_EVENT_LOOP='trio'"):
        load_settings(CommonSettings, env={"STIPPLE_EVENT_LOOP": "trio"})

"""The test relay (tests/support/tcp_proxy.py): once down, nothing goes through it, not even
a connection it accepted just before, whose task first runs after the cut."""

from __future__ import annotations

import asyncio
import contextlib
import gc

import pytest

from tests.support.tcp_proxy import TcpProxy


class Echo:
    """A server that answers what it reads; `close()` also ends its open connections."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        with contextlib.suppress(OSError):
            while data := await reader.read(100):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# asyncio itself leaves a connection it accepted as its server closed, before the relay's
# task was made, unclosed until the collector finds it: nothing goes through it (the test
# reads nothing back), but its ResourceWarning comes from the collector: made to run here.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_connection_accepted_as_the_relay_goes_down_relays_nothing() -> None:
    echo = Echo()
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    relayed = []
    try:
        for spins in range(8):  # the cut at each point of the connection's acceptance
            proxy = TcpProxy(("127.0.0.1", port))
            await proxy.up()
            connecting = asyncio.ensure_future(asyncio.open_connection("127.0.0.1", proxy.port))
            for _ in range(spins):
                await asyncio.sleep(0)
            await proxy.down()
            try:
                reader, writer = await connecting
            except OSError:
                continue  # refused: nothing relayed
            writer.write(b"ping")
            try:
                answer = await asyncio.wait_for(reader.read(4), 0.3)
            except (OSError, TimeoutError):
                answer = b""
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if answer:
                relayed.append(spins)
    finally:
        server.close()
        await echo.close()
        await server.wait_closed()
        await asyncio.sleep(0.1)
        gc.collect()  # here, not in a later test: what asyncio left is finalized now
    assert relayed == []  # it was [4, 5]: accepted, then relayed after the cut

"""A slow HTTP client on a raw socket: a request's head, then its body a piece at a time,
for the server's timeouts on a request that is late (http_protocol.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import httpx


async def send_slowly(
    url: str, head: bytes, pieces: Iterable[bytes] = (), every: float = 0.0
) -> tuple[bytes, float]:
    """Send `head`, then each of `pieces` `every` s apart, and read until the server ends
    its side of the connection (within 5 s of the last piece); stop sending once it has.
    What it sent, and the seconds from the head to its end."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    loop = asyncio.get_running_loop()
    start = loop.time()
    reading = asyncio.ensure_future(reader.read())
    try:
        writer.write(head)
        for piece in pieces:
            await asyncio.wait([reading], timeout=every)
            if reading.done():
                break
            writer.write(piece)
            await writer.drain()
        async with asyncio.timeout(5):
            answer = await reading
        return answer, loop.time() - start
    finally:
        reading.cancel()
        writer.close()


def parsed(answer: bytes, method: str, url: str) -> httpx.Response:
    """The first response of `answer` (raw bytes, a Content-Length body) as httpx's, with
    the request it answers, for `tests.openapi_check.assert_conforms`."""
    head, _, rest = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [(name, value) for name, _, value in (line.partition(": ") for line in lines)]
    length = int(next(value for name, value in headers if name.lower() == "content-length"))
    return httpx.Response(
        int(status_line.split()[1]),
        headers=headers,
        content=rest[:length],
        request=httpx.Request(method, url),
    )

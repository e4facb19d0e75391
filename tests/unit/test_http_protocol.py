"""The coalescing transport: a response's head and body leave in one write, bytes never
reorder or wait past the loop iteration; and uvicorn serves through it unchanged, a
request's head and body held to their limits and timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from prometheus_client import REGISTRY
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT

from tests.support.slow_client import send_slowly
from workflows.application.outages import Sampled
from workflows.entrypoints import http_protocol, observability
from workflows.entrypoints.container import Container, running
from workflows.entrypoints.http import create_app
from workflows.entrypoints.http_protocol import CoalescingHttpToolsProtocol, CoalescingTransport


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.events.append("write")

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        self.events.append("close")

    def abort(self) -> None:
        self.closing = True
        self.events.append("abort")

    def write_eof(self) -> None:
        self.events.append("eof")

    def get_write_buffer_size(self) -> int:
        return 7

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def coalescing() -> tuple[CoalescingTransport, RecordingTransport]:
    inner = RecordingTransport()
    return CoalescingTransport(inner, asyncio.get_running_loop()), inner  # type: ignore[arg-type]


async def test_a_head_and_the_body_written_in_the_same_step_leave_as_one_write() -> None:
    transport, inner = coalescing()
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert inner.writes == []
    transport.write(b"ok")
    assert inner.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    await asyncio.sleep(0)
    assert len(inner.writes) == 1


async def test_a_lone_write_leaves_at_the_end_of_the_loop_iteration() -> None:
    transport, inner = coalescing()
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert transport.get_write_buffer_size() == 7 + len(b"HTTP/1.1 100 Continue\r\n\r\n")
    await asyncio.sleep(0)
    assert inner.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    assert transport.get_write_buffer_size() == 7


async def test_writes_keep_their_order() -> None:
    transport, inner = coalescing()
    for chunk in (b"a", b"b", b"c", b"d", b"e"):
        transport.write(chunk)
    await asyncio.sleep(0)
    assert inner.writes == [b"ab", b"cd", b"e"]


async def test_close_sends_what_is_held_first_and_nothing_after() -> None:
    transport, inner = coalescing()
    transport.write(bytearray(b"last words"))
    transport.close()
    await asyncio.sleep(0)
    assert inner.writes == [b"last words"]
    assert inner.events == ["write", "close"]


async def test_write_eof_sends_what_is_held_first() -> None:
    transport, inner = coalescing()
    transport.write(b"tail")
    transport.write_eof()
    assert inner.events == ["write", "eof"]


async def test_abort_drops_what_is_held() -> None:
    transport, inner = coalescing()
    transport.write(b"never sent")
    transport.abort()
    await asyncio.sleep(0)
    assert inner.writes == []
    assert inner.events == ["abort"]


async def test_nothing_is_written_to_a_transport_closed_underneath() -> None:
    transport, inner = coalescing()
    transport.write(b"late")
    inner.closing = True
    await asyncio.sleep(0)
    assert inner.writes == []


async def test_everything_else_is_the_wrapped_transports() -> None:
    transport, _ = coalescing()
    assert transport.get_extra_info("peername") == "info:peername"


# --- served by uvicorn through the protocol --------------------------------------------


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    path = scope["path"]
    size = 0
    if scope["method"] == "POST":  # read the whole body first
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
    if path == "/stream":
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for n in range(3):
            await send({"type": "http.response.body", "body": b"%d\n" % n, "more_body": True})
            await asyncio.sleep(0.2)
        await send({"type": "http.response.body", "body": b"end\n"})
        return
    if path == "/big":
        body = BIG
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    if path == "/hang":  # answers nothing until cancelled
        await asyncio.Event().wait()
    if path == "/watch":  # what its second receive says: its client leaving
        await receive()
        WATCHED.append((await receive())["type"])
        return
    if path == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b"%d" % size if path == "/size" else b"hello " + path.encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


BIG = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than the sockets' buffers hold
WATCHED: list[str] = []


_SERVERS: list[uvicorn.Server] = []  # every server `serving` started, for a test to stop


@contextlib.asynccontextmanager
async def serving(served_app: Any = app, **options: Any) -> AsyncIterator[str]:
    """`served_app` (this module's `app` by default) served by uvicorn with the protocol
    (and uvicorn `options`); its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        served_app,
        host="127.0.0.1",
        port=port,
        http=CoalescingHttpToolsProtocol,
        log_level="warning",
        lifespan="on" if served_app is app else "off",
        **options,
    )
    server = uvicorn.Server(config)
    _SERVERS.append(server)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:  # noqa: ASYNC110 (uvicorn has no started event)
            await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


@pytest.fixture
async def served() -> AsyncIterator[str]:
    async with serving() as url:
        yield url


async def test_a_connection_that_sends_nothing_is_closed_when_idle_as_after_an_answer() -> None:
    async with serving(timeout_keep_alive=1.0) as url:
        host, port = url.removeprefix("http://").split(":")
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # closed without a word
        finally:
            writer.close()
        assert loop.time() - started >= 0.9
        # A first request that comes within the timeout is served, and its connection kept
        # alive for the next; once its bytes have begun, a head gets HEAD_TIMEOUT (10 s).
        one = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
        two = b"GET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answer = await exchange_raw(url, b"", one, two, pause=0.4)
        assert answer.count(b"HTTP/1.1 200 ") == 2
        slow_head = [b"GET /slow HT", b"TP/1.1\r\nHost: x\r\n", b"Connection: close\r\n\r\n"]
        answer = await exchange_raw(url, *slow_head, pause=0.5)
        assert answer.startswith(b"HTTP/1.1 200 ")


async def test_keep_alive_requests_on_one_connection_get_their_own_answers(served: str) -> None:
    async with httpx.AsyncClient(base_url=served) as client:
        for n in range(20):
            response = await client.get(f"/r{n}")
            assert response.status_code == 200
            assert response.text == f"hello /r{n}"
        empty = await client.get("/empty")
        assert empty.status_code == 204
        assert empty.content == b""
        head = await client.head("/r0")
        assert head.status_code == 200
        assert head.headers["content-length"] == str(len("hello /r0"))
        assert head.content == b""


async def test_a_streamed_body_arrives_as_it_is_sent(served: str) -> None:
    loop = asyncio.get_running_loop()
    arrivals = []
    async with (
        httpx.AsyncClient(base_url=served) as client,
        client.stream("GET", "/stream") as response,
    ):
        async for chunk in response.aiter_raw():
            arrivals.append((loop.time(), chunk))
    assert b"".join(chunk for _, chunk in arrivals) == b"0\n1\n2\nend\n"
    # The first chunk came ~0.6 s before the end: held bytes do not wait for the next write.
    assert arrivals[-1][0] - arrivals[0][0] >= 0.4


async def exchange_raw(url: str, *parts: bytes, pause: float = 0.0) -> bytes:
    """Send `parts` on a new connection (`pause` seconds apart) and read until it closes."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause)
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


async def test_a_head_over_the_limit_is_a_431_problem(served: str) -> None:
    big = b"GET /h HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    answer = await exchange_raw(served, big[:30_000], big[30_000:])
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"connection: close" in head
    assert b"x-content-type-options: nosniff" in head
    assert orjson.loads(body)["type"] == "/problems/request-header-fields-too-large"
    endless = [b"GET /h HTTP/1.1\r\nHost: x\r\n"]
    endless += [b"X-%d: %s\r\n" % (n, b"b" * 9_000) for n in range(12)]  # and never an end
    assert (await exchange_raw(served, *endless)).startswith(b"HTTP/1.1 431 ")
    fits = (
        b"GET /h HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 60_000 + b"\r\nConnection: close\r\n\r\n"
    )
    assert (await exchange_raw(served, fits)).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    "bad",
    [
        b"FOO /h HTTP/1.1\r\nHost: x\r\n\r\n",  # a method the parser does not know
        b"GET /h HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",  # a control character
        b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nabc",  # two framings: request smuggling
    ],
    ids=["unknown-method", "control-character", "length-and-chunked"],
)
async def test_a_request_the_parser_cannot_read_is_a_400_problem(
    served: str, bad: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Answered, counted and logged once per 10 s at INFO (observability.refused): not
    uvicorn's WARNING for each, a line any client could write."""
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    head, _, body = (await exchange_raw(served, bad)).partition(b"\r\n\r\n")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"content-type: application/problem+json" in head
    assert b"connection: close" in head
    assert b"x-content-type-options: nosniff" in head
    assert b"x-request-id: " in head
    assert orjson.loads(body)["type"] == "/problems/invalid-request"


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        (b"", "an HTTP/1.1 request must have a Host header"),
        (b"Host: a\r\nHost: a\r\n", "the request has 2 Host headers: it must have one"),
        (b"Host: a/b\r\n", "the Host header is not a host name"),
        (b"Host: a b\r\n", "the Host header is not a host name"),
        (b"Host: a:8x\r\n", "the Host header is not a host name"),
        (b"Host: user@a\r\n", "the Host header is not a host name"),
    ],
    ids=["none", "two", "slash", "space", "port", "userinfo"],
)
async def test_a_request_without_one_valid_host_is_a_400_problem(
    served: str, headers: bytes, detail: str
) -> None:
    """RFC 9112 3.2: a 400 for an HTTP/1.1 request without Host, and for any request with
    more than one or an invalid one; it never reaches the app."""
    request = b"POST /b HTTP/1.1\r\n" + headers + b"Content-Length: 3\r\n\r\nabc"
    head, _, body = (await exchange_raw(served, request)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), head
    assert b"connection: close" in head
    problem = orjson.loads(body)
    assert problem["type"] == "/problems/invalid-request"
    assert problem["detail"].startswith(detail)
    assert body.count(b"{") == 1  # one answer: the app did not answer the body too


@pytest.mark.parametrize(
    "upgrade",
    [
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQA\r\n",
    ],
    ids=["websocket", "h2c"],
)
async def test_an_upgrade_is_ignored_and_the_request_served_over_http_1_1(
    served: str, caplog: pytest.LogCaptureFixture, upgrade: bytes
) -> None:
    """No WebSocket, no HTTP/2: the request is answered as HTTP/1.1, the connection kept for
    the next one, and nothing is logged."""
    caplog.set_level(logging.INFO)
    first = b"GET /one HTTP/1.1\r\nHost: x\r\n" + upgrade + b"\r\n"
    then = b"GET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await exchange_raw(served, first, then, pause=0.2)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:300]
    assert b"hello /one" in answer
    assert answer.endswith(b"hello /two")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize(
    "body",
    [
        b"Content-Length: 3\r\n\r\nabc",
        b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n",
    ],
    ids=["length", "chunked"],
)
async def test_an_upgrade_request_has_its_body_read_and_the_next_request_served(
    served: str, body: bytes
) -> None:
    """The parser reads no body after an `Upgrade` head, and takes what follows as the new
    protocol's: `curl --http2 -d` POSTs came to the app with an empty body."""
    upgrade = b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMA\r\n"
    posted = b"POST /size HTTP/1.1\r\nHost: x\r\n" + upgrade + body
    then = b"GET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for parts in [(posted + then,), (posted[:60], posted[60:] + then)]:  # one read, or two
        answer = await exchange_raw(served, *parts, pause=0.1)
        first, _, second = answer.partition(b"HTTP/1.1 200 OK\r\n")[2].partition(b"HTTP/1.1 ")
        assert first.endswith(b"\r\n\r\n3"), answer  # /size: the body's 3 bytes
        assert second.startswith(b"200 OK\r\n"), answer
        assert second.endswith(b"hello /two"), answer
    bodiless = b"GET /one HTTP/1.1\r\nHost: x\r\n" + upgrade + b"\r\n"
    answer = await exchange_raw(served, bodiless + then)
    assert b"hello /one" in answer
    assert answer.endswith(b"hello /two")


@pytest.mark.parametrize(
    ("request_", "detail"),
    [
        (b"GET /h\r\n\r\n", "the server speaks HTTP/1.1 and 1.0, not HTTP/0.9"),
        (
            b"POST /size HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n",
            "the transfer coding 'gzip' is not supported",
        ),
        (
            b"POST /size HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: x;q=1\r\n"
            b"Transfer-Encoding: Chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "the transfer coding 'x' is not supported",
        ),
        (
            b"POST /size HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
            "the body's length cannot be known",
        ),
        (
            b"POST /size HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "an HTTP/1.0 request cannot have a Transfer-Encoding header",
        ),
    ],
    ids=["http-0.9", "gzip-chunked", "two-headers", "not-chunked-last", "http-1.0"],
)
async def test_a_version_or_transfer_coding_the_server_does_not_speak_is_a_400(
    served: str, request_: bytes, detail: str
) -> None:
    """RFC 9112 6.1 and 6.3: a body whose length cannot be known is a 400, a transfer coding
    the server does not decode, and an HTTP/0.9 request, are 400s too (not the 501 and 505
    RFC 9112 and 9110 allow: a client's request never gets a 5xx here). The
    coded bytes reached the app as the body, or it waited for them for ever; HTTP/0.9 got
    a 400 as an HTTP/1.1 request without Host."""
    head, _, body = (await exchange_raw(served, request_)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), head
    assert b"connection: close" in head
    problem = orjson.loads(body)
    assert problem["detail"][: len(detail)] == detail


async def test_each_request_on_a_connection_has_its_host_checked(served: str) -> None:
    valid = b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
    invalid = b"GET /two HTTP/1.1\r\nHost: a/b\r\n\r\n"
    answer = await exchange_raw(served, valid, valid, invalid, pause=0.1)
    assert answer.count(b"hello /one") == 2
    assert answer.split(b"hello /one")[-1].startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer


async def test_a_refused_head_followed_by_unreadable_bytes_is_answered_once(
    served: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The first refusal is the answer; the parser's error after it is not a second one (a
    write after the first's end of writing: a fatal error of the connection's protocol)."""
    no_host = b"POST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
    answer = await exchange_raw(served, no_host + b"FOO /h HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.count(b"content-type: ") == 1, answer  # one answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert orjson.loads(body)["detail"] == "an HTTP/1.1 request must have a Host header"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize(
    ("bad", "status"),
    [
        (b"GET /h HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"FOO /h HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # a head the parser cannot read
        (b"GET /h HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        # Refused for its head, then its body cannot be read: still one answer, in its turn.
        (b"POST /h HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", 400),
        # Targets the parser takes and uvicorn cannot: no answer, an ERROR logged, and the
        # earlier answer lost (the refusal was taken for a body's, with the wrong cycle).
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET http://a:bad/h HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET http://example.com HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ],
    ids=[
        "no-host",
        "unreadable",
        "too-large",
        "no-host-then-unreadable",
        "authority-form",
        "bad-port",
        "absolute-form-without-path",
    ],
)
async def test_a_refused_head_pipelined_after_others_is_answered_after_their_answers(
    served: str, caplog: pytest.LogCaptureFixture, bad: bytes, status: int
) -> None:
    """Requests before it on the connection get their whole answers, in order, then the
    refusal, then the connection closes; the app's answers do not fail."""
    earlier = b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = await exchange_raw(served, earlier + bad)
    streamed, _, rest = answer.partition(b"0\r\n\r\n")  # the end of the chunked answer
    assert streamed.startswith(b"HTTP/1.1 200 OK\r\n")
    assert streamed.endswith(b"4\r\nend\n\r\n"), streamed
    two, _, refusal = rest.partition(b"hello /two")
    assert two.startswith(b"HTTP/1.1 200 OK\r\n"), rest[:300]
    assert refusal.startswith(b"HTTP/1.1 %d " % status), refusal[:300]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


BAD_CHUNKS = b"POST /size HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX\r\n"


@pytest.mark.parametrize(
    ("parts", "before"),
    [
        ((BAD_CHUNKS,), b""),  # its app waits for the rest of the body
        ((BAD_CHUNKS[:-9], BAD_CHUNKS[-9:]), b""),  # the bad bytes come in a later read
        ((b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n" + BAD_CHUNKS,), b"4\r\nend\n\r\n0\r\n\r\n"),
    ],
    ids=["waited-for", "later-read", "pipelined"],
)
async def test_a_body_the_parser_cannot_read_is_a_400_problem_at_once(
    served: str, caplog: pytest.LogCaptureFixture, parts: tuple[bytes, ...], before: bytes
) -> None:
    """A chunk that does not end where its size says. The refusal waited for the request's
    own answer, and its app for the rest of its body: no answer, no timeout, for ever."""
    answer = await exchange_raw(served, *parts, pause=0.2)
    earlier, _, refusal = answer.rpartition(b"HTTP/1.1 400 Bad Request\r\n")
    assert earlier.endswith(before), answer[:300]
    assert earlier.startswith(b"HTTP/1.1 200 OK\r\n") if before else earlier == b""
    problem = orjson.loads(refusal.partition(b"\r\n\r\n")[2])
    assert problem["detail"] == "the request's chunked body cannot be read: its framing is invalid"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_body_the_parser_cannot_read_after_its_answer_closes_the_connection(
    served: str,
) -> None:
    """The app answered a PUT without reading its body: the connection is closed, no 400."""
    put = b"PUT /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = await exchange_raw(served, put, b"3\r\nabcXX\r\n", pause=0.2)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert answer.endswith(b"hello /p")


async def test_a_connection_idle_after_a_body_that_ended_after_its_answer_is_closed() -> None:
    """The app answered a PUT before its body came: uvicorn's keep-alive timeout, armed at
    the answer, was cancelled by the body's bytes and never armed again."""
    async with serving(timeout_keep_alive=1.0) as url:
        put = b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
        answer = await exchange_raw(url, put, b"0123456789", pause=0.3)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert answer.endswith(b"hello /p")


async def test_a_head_begun_in_the_read_that_ended_another_request_is_measured_whole(
    served: str,
) -> None:
    """30 KB of it come in the same read as a whole request, 40 KB in a later one."""
    big = b"GET /h HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    first = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n" + big[:30_000]
    answer = await exchange_raw(served, first, big[30_000:], pause=0.2)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.split(b"hello /one")[-1].startswith(b"HTTP/1.1 431 "), answer[-300:]


async def test_a_refused_head_pipelined_after_a_connection_close_is_not_answered(
    served: str, caplog: pytest.LogCaptureFixture
) -> None:
    last = b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await exchange_raw(served, last + b"GET /h HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"4\r\nend\n\r\n0\r\n\r\n"), answer[-200:]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize(
    "request_",
    [
        b"GET /h HTTP/1.0\r\n\r\n",  # HTTP/1.0 needs none
        b"GET /h HTTP/1.1\r\nHost: localhost:8000\r\nConnection: close\r\n\r\n",
        b"GET /h HTTP/1.1\r\nHost: [::1]:8000\r\nConnection: close\r\n\r\n",
        b"GET /h HTTP/1.1\r\nhOsT: 127.0.0.1\r\nConnection: close\r\n\r\n",
        b"GET /h HTTP/1.1\r\nHost: xn--bcher-kva.example:\r\nConnection: close\r\n\r\n",
        b"GET /h HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",  # an empty one is valid
    ],
    ids=["http-1.0", "name-port", "ipv6", "ipv4-any-case", "empty-port", "empty"],
)
async def test_a_request_with_one_valid_host_or_none_in_http_1_0_is_served(
    served: str, request_: bytes
) -> None:
    answer = await exchange_raw(served, request_)
    assert answer.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 ")), answer[:200]


def counted(method: str, status: int) -> float:
    """workflows_http_requests_total of `method` and `status` on no route."""
    labels = {"method": method, "route": "unmatched", "status": str(status)}
    samples = (sample for family in REGISTRY.collect() for sample in family.samples)
    return sum(
        s.value for s in samples if s.name == "workflows_http_requests_total" and s.labels == labels
    )


async def test_what_the_server_answers_itself_is_counted_and_logged_once_per_10_s(
    served: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    timeouts(monkeypatch, gap=0.3)
    monkeypatch.setattr(observability, "_refusals", Sampled(observability.log, level=logging.INFO))
    caplog.set_level(logging.INFO, logger=observability.log.name)
    kinds = [("OTHER", 400), ("OTHER", 431), ("POST", 408)]
    before = [counted(*kind) for kind in kinds]
    for _ in range(2):
        await exchange_raw(served, b"FOO /h HTTP/1.1\r\nHost: x\r\n\r\n")
    await exchange_raw(served, b"GET /h HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    await send_slowly(served, posting(10) + b"abc")  # its head read: method POST
    assert [counted(*kind) - n for kind, n in zip(kinds, before, strict=True)] == [2, 1, 1]
    logged = [r.getMessage() for r in caplog.records if r.name == observability.log.name]
    assert [line.split(" (")[0] for line in logged] == [
        "answered 400 itself",  # the second 400 within 10 s: counted, not logged
        "answered 431 itself",
        "answered 408 itself",
    ]


async def test_a_head_that_does_not_come_in_time_is_a_408(
    served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_protocol, "HEAD_TIMEOUT", 0.3)
    started = asyncio.get_running_loop().time()
    answer = await exchange_raw(served, b"GET /h HTTP/1.1\r\n")
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert asyncio.get_running_loop().time() - started < 3
    # Neither a slow body nor an idle keep-alive connection is a late head.
    slow_body = [b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"]
    answer = await exchange_raw(served, *slow_body, b"a", b"b", b"c", pause=0.2)
    assert answer.startswith(b"HTTP/1.1 200 ")
    one = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
    two = b"GET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await exchange_raw(served, one, two, pause=0.6)
    assert answer.count(b"HTTP/1.1 200 ") == 2


async def test_a_head_begun_in_the_read_that_ended_an_answered_request_is_timed(
    served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PUT answered before its body came; the body's end and the start of a next head in
    one read, then nothing: no timer was left (the keep-alive timeout had gone with the
    answer), and the connection was held for ever."""
    monkeypatch.setattr(http_protocol, "HEAD_TIMEOUT", 0.3)
    put = b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
    answer = await exchange_raw(served, put, b"0123456789GET /two HTTP/1.1\r\nHo", pause=0.3)
    answered, _, late = answer.partition(b"hello /p")
    assert answered.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert late.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer


def timeouts(monkeypatch: pytest.MonkeyPatch, gap: float, whole: float = 10.0) -> None:
    monkeypatch.setattr(http_protocol, "BODY_GAP_TIMEOUT", gap)
    monkeypatch.setattr(http_protocol, "BODY_TIMEOUT", whole)


def posting(length: int, path: str = "/b") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path.encode(), length)


def problem_of(answer: bytes) -> dict[str, Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer[:200]
    assert b"content-type: application/problem+json" in head
    assert b"connection: close" in head
    assert b"x-content-type-options: nosniff" in head
    problem: dict[str, Any] = orjson.loads(body)
    assert problem["type"] == "/problems/request-timeout"
    assert problem["title"] == "Request Timeout"
    assert problem["status"] == 408
    return problem


async def test_a_body_that_stops_coming_is_a_408(
    served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeouts(monkeypatch, gap=0.3)
    answer, seconds = await send_slowly(served, posting(10) + b"abc")
    detail = "no byte of the request's body arrived for 0.3 s"
    assert problem_of(answer)["detail"] == detail
    assert 0.3 <= seconds < 2
    answer, seconds = await send_slowly(served, posting(10))  # the headers, and no body
    assert problem_of(answer)["detail"] == detail
    assert 0.3 <= seconds < 2


async def test_a_body_that_trickles_is_a_408_at_its_deadline(
    served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeouts(monkeypatch, gap=0.5, whole=1.0)
    answer, seconds = await send_slowly(served, posting(100), [b"a"] * 40, every=0.1)
    detail = (
        "the request's body did not all arrive within 1 s of its headers,"
        " nor keep coming at 17476 bytes/s on average"
    )
    assert problem_of(answer)["detail"] == detail
    assert 1.0 <= seconds < 2.5


async def test_a_body_that_keeps_coming_is_read_whole_however_long_it_takes_within_the_deadline(
    served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeouts(monkeypatch, gap=0.3, whole=4.0)
    body = b"x" * 1024 * 1024
    pieces = [body[n : n + 65536] for n in range(0, len(body), 65536)]
    head = posting(len(body), "/size").replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    answer, seconds = await send_slowly(served, head, pieces, every=0.1)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert answer.endswith(b"\r\n\r\n1048576")
    assert seconds > 1.5  # five times the gap


async def test_a_body_that_keeps_coming_at_the_minimum_rate_is_not_late_after_the_deadline(
    served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past BODY_TIMEOUT a body is late only once it has averaged less than BODY_MIN_RATE
    since its headers: a larger MAX_BODY_BYTES gets the time its bodies need over the same
    link. Here 100 bytes at ~50 bytes/s, twice the rate, take ~2 s of a 1 s deadline; at
    ~10 bytes/s, half the rate, the same body is a 408 at the deadline."""
    timeouts(monkeypatch, gap=0.5, whole=1.0)
    monkeypatch.setattr(http_protocol, "BODY_MIN_RATE", 20)
    head = posting(100, "/size").replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    answer, seconds = await send_slowly(served, head, [b"x" * 5] * 20, every=0.1)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert answer.endswith(b"\r\n\r\n100")
    assert seconds > 1.5
    answer, seconds = await send_slowly(served, head, [b"x"] * 100, every=0.1)
    assert problem_of(answer)["detail"] == (
        "the request's body did not all arrive within 1 s of its headers,"
        " nor keep coming at 20 bytes/s on average"
    )
    assert 1.0 <= seconds < 2.5


async def test_a_body_waiting_behind_an_earlier_request_is_not_late(
    served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pipelined behind a GET answered over ~0.6 s, the POST's body is not read meanwhile:
    that wait is the server's, not the client's."""
    timeouts(monkeypatch, gap=0.3, whole=0.5)
    first = b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n"
    second = posting(3, "/size").replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    answer, _ = await send_slowly(served, first + second + b"a", [b"bc"], every=0.4)
    assert answer.count(b"HTTP/1.1 200 ") == 2, answer
    assert answer.endswith(b"\r\n\r\n3")


async def test_a_body_left_unread_by_the_answer_closes_its_connection_when_late(
    served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answered without its body read (the app had no use for it), a request whose body
    then trickles gets no 408: its connection is closed at the deadline."""
    timeouts(monkeypatch, gap=0.5, whole=1.0)
    head = b"GET /r HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    answer, seconds = await send_slowly(served, head, [b"a"] * 40, every=0.1)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"\r\n\r\nhello /r")
    assert 1.0 <= seconds < 2.5


# --- an answer its client does not read ---------------------------------------------------


def unread_count() -> float:
    return REGISTRY.get_sample_value("workflows_http_unread_answers_total") or 0.0


def slow_count() -> float:
    return REGISTRY.get_sample_value("workflows_http_slow_answers_total") or 0.0


async def small_window_connection(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose receive buffer is small, so that most of a large answer waits in
    the server's memory until it is read."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return await asyncio.open_connection(sock=sock)


async def read_all(reader: asyncio.StreamReader, pace: float = 0.0, size: int = 1 << 20) -> bytes:
    """Read until the connection ends (a reset counts as an end), `size` bytes at a time,
    `pace` s apart."""
    got = bytearray()
    try:
        async with asyncio.timeout(20):
            while chunk := await reader.read(size):
                got += chunk
                await asyncio.sleep(pace)
    except ConnectionResetError:
        pass
    return bytes(got)


@pytest.mark.parametrize("connection", ["keep-alive", "close"])
async def test_an_answer_its_client_does_not_read_is_dropped_with_its_connection(
    served: str, monkeypatch: pytest.MonkeyPatch, connection: str
) -> None:
    """A client that asks and then reads nothing (a hung process, whose kernel keeps the
    connection open) held its answer in the server's memory for as long as it lived. After
    UNREAD_TIMEOUT without taking a byte, the server closes the connection and drops the
    rest: what the client then reads ends short of the answer. Also when the server was
    already closing the connection (Connection: close), which waits to send its buffer."""
    monkeypatch.setattr(http_protocol, "UNREAD_TIMEOUT", 0.5)
    before = unread_count()
    reader, writer = await small_window_connection(served)
    try:
        request = b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: %s\r\n\r\n"
        writer.write(request % connection.encode())
        await asyncio.sleep(1.5)  # reading nothing: the timeout, and a margin
        got = await read_all(reader)
    finally:
        writer.close()
    assert got.startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(got) < len(BIG)  # what the sockets held, not the rest
    assert unread_count() == before + 1


async def test_an_answer_read_slowly_but_steadily_arrives_whole(
    served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that takes some of the answer within every UNREAD_TIMEOUT gets all of it,
    however long that takes in all (here ~2.5 s, five times the timeout)."""
    monkeypatch.setattr(http_protocol, "UNREAD_TIMEOUT", 0.5)
    before, slow_before = unread_count(), slow_count()
    reader, writer = await small_window_connection(served)
    try:
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        started = asyncio.get_running_loop().time()
        got = await read_all(reader, pace=0.1, size=256 * 1024)
        took = asyncio.get_running_loop().time() - started
    finally:
        writer.close()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == BIG
    assert took > 1.0  # longer than the timeout, twice
    assert unread_count() == before
    assert slow_count() == slow_before


async def test_an_answer_taken_under_the_minimum_rate_is_dropped_with_its_connection(
    served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that takes some of the answer at every look, but less than ANSWER_MIN_RATE
    on average over an UNREAD_TIMEOUT (here ~1.6 MB/s against 64 MiB/s), held it for as
    long as it went on: at the end of the window the server closes the connection and drops
    what it held. The client still reads what the kernel had queued, then the end."""
    monkeypatch.setattr(http_protocol, "UNREAD_TIMEOUT", 0.5)
    monkeypatch.setattr(http_protocol, "ANSWER_MIN_RATE", 64 << 20)
    before, unread_before = slow_count(), unread_count()
    reader, writer = await small_window_connection(served)
    try:
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = await read_all(reader, pace=0.01, size=16 * 1024)
    finally:
        writer.close()
    assert got.startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(got) < len(BIG) * 3 // 4  # the rest was dropped (read whole in ~5 s else)
    assert slow_count() == before + 1
    assert unread_count() == unread_before  # it did read: not the other rule


def files_in(directory: str | os.PathLike[str]) -> list[str]:
    return os.listdir(directory) if os.path.isdir(directory) else []


@pytest.mark.parametrize("hot", [True, False])
async def test_a_consume_whose_client_leaves_before_the_commit_leaves_it_queued(
    container: Container, monkeypatch: pytest.MonkeyPatch, hot: bool
) -> None:
    """Served by uvicorn, whose app goes on when a client disconnects: asked again once
    the CSV is made, the consume puts the workflow back (a large document's CSV takes a
    while; here the render waits until the client has gone)."""
    exporter = container.exporter()
    rendering, gone = asyncio.Event(), asyncio.Event()
    render = exporter.render

    async def render_slowly(workflow: Any) -> bytes:
        content = await render(workflow)
        rendering.set()
        await gone.wait()
        return content

    monkeypatch.setattr(exporter, "render", render_slowly)
    app = create_app(container, hot_routes=hot)
    async with running(container), serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        created = await client.post("/workflow", json={"data": {"a": 1}})
        uuid = created.json()["uuid"]
        host, port = url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /workflow/consume HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        await asyncio.wait_for(rendering.wait(), 5)
        writer.close()  # the client leaves while its workflow is claimed
        await writer.wait_closed()
        await asyncio.sleep(0.2)  # the server sees the close
        gone.set()
        await asyncio.sleep(0.2)
        stored = (await client.get(f"/workflow/{uuid}")).json()
        assert (stored["status"], stored["delivery_attempts"]) == ("inserted", 0)
        assert files_in(container.settings().export_dir) == []  # no file written
        taken = await client.post("/workflow/consume")
        assert (taken.status_code, taken.headers["x-workflow-uuid"]) == (200, uuid)


@pytest.fixture
def most_queued(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The most requests a connection had waiting behind the one being answered, and the
    largest body read for one of them, after each read the protocol parsed."""
    seen = {"requests": 0, "body": 0}
    received = CoalescingHttpToolsProtocol.data_received

    def spied(self: CoalescingHttpToolsProtocol, data: bytes) -> None:
        received(self, data)
        seen["requests"] = max(seen["requests"], len(self.pipeline))
        bodies = [len(cycle.body) for cycle, _ in self.pipeline]
        seen["body"] = max([seen["body"], *bodies])

    monkeypatch.setattr(CoalescingHttpToolsProtocol, "data_received", spied)
    return seen


async def test_pipelined_requests_wait_unparsed_past_the_limit_and_all_are_answered(
    served: str, most_queued: dict[str, int]
) -> None:
    """20,000 small requests in one send, their answers read only once all is sent. Parsed
    whole, a read of them queued ~8,000 requests (80 bytes of memory per byte read), and
    every answer let another read in: ten such clients took a worker to 1.27 GB."""
    one = b"GET /h HTTP/1.1\r\nHost: x\r\n\r\n"
    host, port = served.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(one * 20_000 + b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.5)
    async with asyncio.timeout(30):
        answers = await reader.read()
    writer.close()
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 20_001
    assert answers.count(b"hello /h") == 20_000
    assert answers.endswith(b"hello /last")
    slice_of_requests = http_protocol.FEED_SLICE // len(one) + 1
    assert 0 < most_queued["requests"] <= http_protocol.PIPELINE_LIMIT + slice_of_requests


async def test_the_body_of_a_pipelined_request_is_read_no_further_until_its_turn(
    served: str, most_queued: dict[str, int]
) -> None:
    """Behind 300 requests, a POST of 8 MiB: uvicorn paused reading past 64 KiB of its body,
    but each earlier answer resumed it, and the body piled up before its app had started
    (and could refuse it for its size)."""
    size = 8 * 1024 * 1024
    post = b"POST /size HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
    earlier = b"GET /h HTTP/1.1\r\nHost: x\r\n\r\n" * 300
    last = b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await exchange_raw(served, earlier + post, b"x" * size + last)
    assert answer.count(b"hello /h") == 300
    sized, _, last_answer = answer.rpartition(b"HTTP/1.1 200 OK\r\n")
    assert sized.endswith(b"\r\n\r\n%d" % size)  # the POST's app read all of its body
    assert last_answer.endswith(b"hello /last")
    bound = HIGH_WATER_LIMIT + http_protocol.FEED_SLICE
    assert 0 < most_queued["body"] <= bound, most_queued


@pytest.mark.parametrize(
    ("trailers", "status"),
    [
        (b"X-One: 1\r\nX-Two: 2\r\n", 200),  # dropped: the app sees the body alone
        (b"X: y\r\n" * 20_000, 431),  # 120 KB of short fields: each counted
        (b"X: " + b"y" * 200_000 + b"\r\n", 431),  # one field httptools gathers whole
    ],
    ids=["few", "many", "one-long"],
)
async def test_trailer_fields_are_dropped_and_held_to_the_head_limit(
    served: str, caplog: pytest.LogCaptureFixture, trailers: bytes, status: int
) -> None:
    """21 MB of trailer fields took a worker from 70 to 490 MB, and a 40 MB one held the
    event loop 12 s: neither counted towards MAX_HEAD_BYTES nor the body."""
    head = b"POST /size HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    chunked = head + b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\n"
    parts = [chunked] + [trailers[i : i + 60_000] for i in range(0, len(trailers), 60_000)]
    answer = await exchange_raw(served, *parts, b"\r\n", pause=0.05)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    if status == 200:
        assert answer.endswith(b"\r\n\r\n3")
    else:
        problem = orjson.loads(answer.partition(b"\r\n\r\n")[2])
        assert problem["type"] == "/problems/request-header-fields-too-large"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_request_answered_while_others_wait_learns_its_client_has_gone() -> None:
    """uvicorn told only the last request read that its client had gone: the one being
    answered wrote on to the closed transport (with uvloop, an ERROR for each write)."""
    WATCHED.clear()
    async with serving(timeout_graceful_shutdown=1) as url:
        await _leave_while_answered(url)
    assert WATCHED == ["http.disconnect"]


async def _leave_while_answered(url: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /watch HTTP/1.1\r\nHost: x\r\n\r\nGET /h HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    async with asyncio.timeout(5):
        while not WATCHED:  # noqa: ASYNC110 (the app's own record)
            await asyncio.sleep(0.01)


async def test_a_request_cancelled_at_the_graceful_timeout_is_a_503_problem_not_a_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At a rolling update, a request still running when `--graceful-timeout` ran out got
    uvicorn's bare 500 `text/plain`, and an ERROR with a traceback was logged."""
    caplog.set_level(logging.INFO)
    uvicorn_log = logging.getLogger("uvicorn.error")  # it does not propagate to caplog's
    uvicorn_log.addHandler(caplog.handler)
    try:
        answer = await _cancelled_at_shutdown()
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer
    assert b"retry-after: 1" in head
    assert b"content-type: application/problem+json" in head
    assert orjson.loads(body)["type"] == "/problems/service-unavailable"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert [e for e in errors if not e.startswith("Cancel 1 running task(s)")] == []
    assert any("cancelled a request at the graceful" in r.getMessage() for r in caplog.records)


async def _cancelled_at_shutdown() -> bytes:
    async with serving(timeout_graceful_shutdown=0.5) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        server = next(s for s in _SERVERS if s.config.port == int(port))
        server.should_exit = True
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
    return answer


async def test_a_body_refused_before_its_app_ran_is_counted_on_its_route(
    container: Container,
) -> None:
    """README, Observability: a refusal is counted with the request's method and route once
    its head was read. A chunked body the parser cannot read, in the read that brought the
    head, was counted POST and `unmatched`: its app had not run to be asked the routes."""
    labels = {"method": "POST", "route": "/workflow", "status": "400"}
    before = REGISTRY.get_sample_value("workflows_http_requests_total", labels) or 0.0
    bad = b"POST /workflow HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with running(container), serving(create_app(container)) as url:
        answer = await exchange_raw(url, bad + b"2\r\nabcdef\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert REGISTRY.get_sample_value("workflows_http_requests_total", labels) == before + 1


async def test_a_head_whole_but_unread_behind_held_requests_is_not_late(
    served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 requests queue behind a slow answer, and the last one's head comes in two sends:
    reading is held (PIPELINE_LIMIT), so its rest stayed in the kernel, and its head timer
    answered 408 though the client had sent it all at once."""
    monkeypatch.setattr(http_protocol, "HEAD_TIMEOUT", 0.3)
    queued = b"GET /h HTTP/1.1\r\nHost: x\r\n\r\n" * 40
    last = b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await exchange_raw(
        served,
        b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n" + queued + last[:20],
        last[20:],
        pause=0.1,
    )
    assert b" 408 " not in answer, answer[-300:]
    assert answer.count(b"hello /h") == 40
    assert answer.endswith(b"hello /last")


async def test_a_request_held_behind_many_learns_its_client_has_gone() -> None:
    """With 40 requests queued behind it, reading was held: the client's leaving went
    unseen, and a long-poll consume took a workflow for no one."""
    WATCHED.clear()
    async with serving(timeout_graceful_shutdown=1) as url:
        host, port = url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        queued = b"GET /h HTTP/1.1\r\nHost: x\r\n\r\n" * 40
        writer.write(b"GET /watch HTTP/1.1\r\nHost: x\r\n\r\n" + queued)
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        async with asyncio.timeout(5):
            while not WATCHED:  # noqa: ASYNC110 (the app's own record)
                await asyncio.sleep(0.01)
    assert WATCHED == ["http.disconnect"]


async def test_a_request_started_after_the_shutdown_began_and_cancelled_is_a_503() -> None:
    """Pipelined behind a request that was running when the shutdown began, it started
    later, and the graceful timeout cut it: uvicorn's 500 and an ERROR, as before."""
    async with serving(timeout_graceful_shutdown=1.0) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\nGET /hang HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.1)
        next(s for s in _SERVERS if s.config.port == int(port)).should_exit = True
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
    streamed, _, cut = answer.partition(b"0\r\n\r\n")
    assert streamed.startswith(b"HTTP/1.1 200 OK\r\n")
    assert cut.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), answer


@pytest.mark.parametrize(
    "request_",
    [
        b"POST /size HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n"
        b"Connection: Upgrade, HTTP2-Settings, close\r\nHTTP2-Settings: AAMA\r\n"
        b"Content-Length: 3\r\n\r\nabc",
        b"GET /one HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ],
    ids=["upgrade-and-close", "http-1.0"],
)
async def test_an_upgrade_request_that_ends_its_connection_is_served_too(
    served: str, request_: bytes
) -> None:
    """The parser that took such a request dropped what followed it, its own head parsed
    again without `Upgrade` included: no answer, then a 408 (a re-audit)."""
    answer = await exchange_raw(served, request_)
    assert answer.startswith((b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 200 OK\r\n")), answer[:200]
    assert answer.endswith((b"\r\n\r\n3", b"hello /one")), answer[-200:]

"""Random requests against the HTTP protocol (http_protocol.py), served by uvicorn: whatever
bytes a client sends, and however they are split into reads, the server answers or closes
the connection in bounded time, never with a 5xx, writes nothing after it ended its
writing, and logs no error; against a small test app, and against the service itself (the
memory backend, its real routes). Cases are drawn from fixed seeds, so a run is the same
every time; each one mixes up to three requests on a connection, with and without bodies
(by length, chunked, badly chunked, other transfer codings, both framings), Upgrade,
Expect, missing or repeated Host, odd versions and oversized heads, and one in ten stops
anywhere.

It found, before they were fixed: a connection held for ever when a request's body ended
after its answer (uvicorn's keep-alive timeout, cancelled by the body's bytes, was never
armed again), or when a head began in the read that ended such a body and stopped there;
a refused head whose body could not be read either answered at once, before an earlier
request's answer, which then failed in the app; and 501 and 505 answers to a client's
requests."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from tests.unit.test_http_protocol import serving
from workflows.entrypoints import http_protocol
from workflows.entrypoints.container import Container, running
from workflows.entrypoints.http import create_app

PATHS = [b"/size", b"/stream", b"/one", b"/empty", b"/big"]
METHODS = [b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"FOO", b"CONNECT"]
VERSIONS = [b" HTTP/1.1"] * 8 + [b" HTTP/1.0", b" HTTP/2.0", b""]
BAD_CHUNKS = [b"ZZ\r\n", b"3\r\nabcXX\r\n", b"3\r\nabc\r\n0\r\nbad trailer\r\n\r\n", b"-1\r\n"]
BODIES = [
    b"",
    b"abcde",
    b"abcde" * 3,
    b'{"data": {"a": 1}, "steps": ["x"]}',
    b'{"status": "consumed"}',
]
OTHER_CODINGS = [b"gzip", b"gzip, chunked", b"identity", b"chunked, gzip"]
ENDS_WITHIN = 8.0
"""Seconds a connection may take to end: the timeouts below are well under a second."""


def a_request(draw: random.Random, methods: list[bytes], paths: list[bytes]) -> bytes:
    line = draw.choice(methods) + b" " + draw.choice(paths) + draw.choice(VERSIONS) + b"\r\n"
    headers = []
    if draw.random() < 0.5:
        headers.append(b"Content-Type: application/json")
    if draw.random() < 0.95:
        headers.append(b"Host: x")
    if draw.random() < 0.1:
        headers.append(b"Host: y")
    body = draw.choice(BODIES)
    framing = draw.choice(["length", "chunked", "none", "other", "both", "bad", "expect"])
    payload = b""
    if framing in ("length", "expect"):
        headers.append(b"Content-Length: %d" % len(body))
        payload = body
        if framing == "expect":
            headers.append(b"Expect: 100-continue")
    elif framing == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    elif framing == "other":
        headers.append(b"Transfer-Encoding: " + draw.choice(OTHER_CODINGS))
        payload = body
    elif framing == "both":
        headers += [b"Content-Length: 3", b"Transfer-Encoding: chunked"]
        payload = b"3\r\nabc\r\n0\r\n\r\n"
    elif framing == "bad":
        headers.append(b"Transfer-Encoding: chunked")
        payload = draw.choice(BAD_CHUNKS)
    if draw.random() < 0.2:
        headers += [b"Upgrade: " + draw.choice([b"h2c", b"websocket"]), b"Connection: Upgrade"]
    if draw.random() < 0.1:
        headers.append(b"X-Big: " + b"a" * draw.randint(60_000, 70_000))
    if draw.random() < 0.05:
        payload = payload[: draw.randint(0, len(payload))]  # the client stops short
    return line + b"".join(header + b"\r\n" for header in headers) + b"\r\n" + payload


async def sent_and_ended(url: str, data: bytes, cuts: list[int]) -> bytes | None:
    """Send `data` in reads split at `cuts`; what came back, or None if the connection was
    still open ENDS_WITHIN seconds later."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    answer = b""
    try:
        start = 0
        for cut in [*sorted(cuts), len(data)]:
            writer.write(data[start:cut])
            start = cut
            await writer.drain()
            await asyncio.sleep(0.02)
    except ConnectionError:
        pass  # the server closed first: what it answered is still to read
    try:
        async with asyncio.timeout(ENDS_WITHIN):
            while chunk := await reader.read(1 << 20):
                answer += chunk
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    finally:
        writer.close()
    return answer


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, seconds in [
        ("HEAD_TIMEOUT", 0.7),
        ("BODY_GAP_TIMEOUT", 0.5),
        ("BODY_TIMEOUT", 1.0),
        ("REFUSED_LINGER", 0.2),
    ]:
        monkeypatch.setattr(http_protocol, name, seconds)


Result = tuple[bytes, list[int], bytes | None]


async def fuzzed(url: str, seed: int, methods: list[bytes], paths: list[bytes]) -> list[Result]:
    """200 connections' worth of requests drawn from `seed`, 20 at a time: each one's bytes,
    where its reads were split, and what came back (None: still open, see sent_and_ended)."""
    draw = random.Random(seed)
    cases = []
    for _ in range(200):
        data = b"".join(a_request(draw, methods, paths) for _ in range(draw.randint(1, 3)))
        if draw.random() < 0.1:  # the client stops anywhere, in a head too
            data = data[: draw.randint(1, len(data))]
        cases.append((data, [draw.randint(0, len(data)) for _ in range(draw.randint(0, 2))]))
    limit = asyncio.Semaphore(20)

    async def run(data: bytes, cuts: list[int]) -> bytes | None:
        async with limit:
            return await sent_and_ended(url, data, cuts)

    answers = await asyncio.gather(*(run(data, cuts) for data, cuts in cases))
    return [(data, cuts, answer) for (data, cuts), answer in zip(cases, answers, strict=True)]


def assert_ended_well(results: list[Result], records: list[logging.LogRecord]) -> None:
    held = [(data[:300], cuts) for data, cuts, answer in results if answer is None]
    assert held == []
    answers = [answer for _, _, answer in results if answer]
    assert all(answer.startswith(b"HTTP/1.1 ") for answer in answers)
    assert not [answer[:300] for answer in answers if b"HTTP/1.1 5" in answer]  # no 5xx
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == []


@pytest.mark.usefixtures("short_timeouts")
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_whatever_a_client_sends_the_connection_ends_in_time_and_nothing_fails(
    caplog: pytest.LogCaptureFixture, seed: int
) -> None:
    caplog.set_level(logging.WARNING)
    async with serving(timeout_keep_alive=0.5) as url:
        results = await fuzzed(url, seed, METHODS, PATHS)
    assert_ended_well(results, caplog.records)


@pytest.mark.usefixtures("short_timeouts")
async def test_the_service_s_own_routes_too(
    container: Container, caplog: pytest.LogCaptureFixture
) -> None:
    """The same against the service (the memory backend): its POST, PATCH, consume, list,
    CSV and health routes, none of which may answer a 5xx or log an error."""
    caplog.set_level(logging.WARNING)
    async with running(container), serving(create_app(container), timeout_keep_alive=0.5) as url:
        body = b'{"data": {"a": 1}, "steps": ["x"]}'
        head = b"POST /workflow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        created = await sent_and_ended(url, head + body, [])
        assert created is not None
        assert created.startswith(b"HTTP/1.1 201 "), created
        item = b"/workflow/" + created.partition(b'"uuid":"')[2][:36]
        paths = [b"/workflow", b"/workflow/consume", b"/workflow/consume?wait=0.3", item]
        paths += [item + b"/csv", b"/healthz", b"/workflow?limit=2", b"/nowhere"]
        methods = [b"GET", b"POST", b"PATCH", b"HEAD", b"DELETE", b"FOO"]
        results = await fuzzed(url, 4, methods, paths)
    assert_ended_well(results, caplog.records)

"""A request whose body is late, against the real app on the real services, served by
uvicorn through our protocol and sent over a real socket: a 408 problem, the connection
closed, nothing stored or queued and no error logged, for POST (the hot route and the
Starlette one) and PATCH alike. The timeouts are shortened for the test."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
import uvicorn

from tests.integration.test_bad_input_changes_nothing import state
from tests.openapi_check import assert_conforms
from tests.support.slow_client import parsed, send_slowly
from tests.support.tcp_proxy import free_port
from workflows.entrypoints import http_protocol
from workflows.entrypoints.config import Settings
from workflows.entrypoints.container import Container, running
from workflows.entrypoints.http import create_app
from workflows.entrypoints.http_protocol import CoalescingHttpToolsProtocol

GAP, WHOLE = 0.3, 1.5
Served = tuple[str, Container]


@pytest.fixture(params=[True, False], ids=["hot routes", "starlette only"])
async def served(
    request: pytest.FixtureRequest, backend_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Served]:
    monkeypatch.setattr(http_protocol, "BODY_GAP_TIMEOUT", GAP)
    monkeypatch.setattr(http_protocol, "BODY_TIMEOUT", WHOLE)
    container = Container(settings=backend_settings)
    async with running(container):
        port = free_port()
        config = uvicorn.Config(
            create_app(container, hot_routes=request.param),
            host="127.0.0.1",
            port=port,
            http=CoalescingHttpToolsProtocol,
            lifespan="off",
            log_config=None,  # uvicorn's own errors reach the root logger, and caplog
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110 (uvicorn has no started event)
                await asyncio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{port}", container
        finally:
            server.should_exit = True
            await task
            if backend_settings.queue_backend == "rabbitmq":
                await container.broker().delete_queue()


async def settled(container: Container) -> tuple[int, ...]:
    """The state once every workflow is queued (rabbitmq: the relay has published it, the
    broker counts it, the outbox is empty)."""
    async with asyncio.timeout(10):
        while True:
            counts = await state(container)
            if len(counts) == 3 or (counts[1] == 0 and counts[3] == counts[0]):
                return counts
            await asyncio.sleep(0.05)


def head(method: str, path: str, length: int) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def timed_out(answer: bytes, method: str, url: str) -> str:
    """The 408 problem's detail, the answer checked against openapi.yaml."""
    response = parsed(answer, method, url)
    assert response.status_code == 408, answer[:300]
    assert response.headers["connection"] == "close"
    assert_conforms(response)
    assert response.json()["type"] == "/problems/request-timeout"
    detail: str = response.json()["detail"]
    return detail


async def test_a_body_that_stops_is_a_408_that_changes_nothing(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    url, container = served
    async with httpx.AsyncClient(base_url=url) as client:
        created = await client.post("/workflow", json={"data": {"a": 1}})
    assert created.status_code == 201
    item = created.headers["location"]
    before = await settled(container)
    # Each body is whole JSON but for its last 5 declared bytes, which never come.
    for method, path, body in [
        ("POST", "/workflow", b'{"data": {"late": true}}'),
        ("POST", "/v1/workflow", b'{"data": {"late": true}}'),
        ("PATCH", item, b'{"status": "consumed"}'),
        ("PATCH", item.replace("/workflow/", "/v1/workflow/"), b'{"status": "consumed"}'),
    ]:
        answer, seconds = await send_slowly(url, head(method, path, len(body) + 5) + body)
        detail = timed_out(answer, method, url + path)
        assert detail == f"no byte of the request's body arrived for {GAP:g} s"
        assert GAP <= seconds < GAP + 2
    assert await state(container) == before
    async with httpx.AsyncClient(base_url=url) as client:
        assert (await client.get(item)).json() == created.json()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_body_that_trickles_is_a_408_at_its_deadline_that_changes_nothing(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    url, container = served
    before = await state(container)
    body = b'{"data": {"a": 1}}' + b" " * 100
    answer, seconds = await send_slowly(
        url, head("POST", "/workflow", len(body)), [bytes([byte]) for byte in body], every=0.1
    )
    detail = timed_out(answer, "POST", url + "/workflow")
    assert detail == (
        f"the request's body did not all arrive within {WHOLE:g} s of its headers,"
        f" nor keep coming at {http_protocol.BODY_MIN_RATE} bytes/s on average"
    )
    assert WHOLE <= seconds < WHOLE + 2
    assert await state(container) == before
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_body_of_1_mib_that_keeps_coming_is_stored(served: Served) -> None:
    """Sent in 64 KiB pieces over a second, several times the gap, within the deadline."""
    url, container = served
    before = await state(container)
    padding = 1024 * 1024 - len(b'{"data": {"a": ""}}')
    body = b'{"data": {"a": "' + b"x" * padding + b'"}}'
    assert len(body) == container.settings().max_body_bytes
    pieces = [body[n : n + 65536] for n in range(0, len(body), 65536)]
    request = head("POST", "/workflow", len(body)).replace(
        b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"
    )
    answer, seconds = await send_slowly(url, request, pieces, every=0.06)
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]
    assert seconds > 3 * GAP
    assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["data"]["a"] == "x" * padding
    assert (await state(container))[0] == before[0] + 1

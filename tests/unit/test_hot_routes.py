"""The hot routes (hot.py) answer exactly as the Starlette app does.

The same requests go to two apps over fresh in-memory containers: one answers the hot
routes in plain ASGI, the other through Starlette's layers. Status, every header (in
order) and body must match, once uuids, timestamps and generated request ids are masked.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import uuid4

import attrs
import httpx
import pytest
from dependency_injector import providers
from prometheus_client import REGISTRY

from workflows.domain.errors import DependencyUnavailable
from workflows.entrypoints.config import Settings
from workflows.entrypoints.container import Container
from workflows.entrypoints.hot import HotRoutes, _ClientWatch, _ready_message
from workflows.entrypoints.http import create_app

UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TIME = re.compile(rb"\d{4}-\d\d-\d\dT[0-9:.]+(Z|[+-]\d\d:\d\d)")
JSON = {"Content-Type": "application/json"}
BODY = b'{"data": {"a": 1, "b": {"c": [1, 2.50]}}, "steps": ["one", "two"]}'

Send = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]
CREATED: dict[int, str] = {}  # the Location of each client's last POST


def post(
    body: bytes = BODY, headers: dict[str, str] | None = None, path: str = "/workflow"
) -> Send:
    async def send(client: httpx.AsyncClient) -> httpx.Response:
        response = await client.post(path, content=body, headers={**JSON, **(headers or {})})
        if "location" in response.headers:
            CREATED[id(client)] = response.headers["location"]  # for get_created
        return response

    return send


def get_created(suffix: str = "", headers: dict[str, str] | None = None) -> Send:
    """GET the workflow the last POST created (each app made its own uuid), + suffix."""

    def send(client: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        return client.get(CREATED[id(client)] + suffix, headers=headers)

    return send


def get(path: str) -> Send:
    def send(client: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        return client.get(path)

    return send


def streamed(body: bytes, chunk: int = 4096) -> Send:
    """A POST whose body comes in chunks, with no Content-Length (chunked encoding)."""

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), chunk):
            yield body[start : start + chunk]

    def send(client: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        return client.post("/workflow", content=chunks(), headers=JSON)

    return send


def keyed_twice(second: str) -> Send:
    """A POST with two Idempotency-Key headers."""

    def send(client: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        keys = [("Idempotency-Key", "k-1"), ("Idempotency-Key", second)]
        return client.post("/workflow", content=BODY, headers=[*keys, *JSON.items()])

    return send


def typed_twice(first: str, second: str, path: str = "/workflow") -> Send:
    """A POST with two Content-Type headers."""

    def send(client: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        types = [("Content-Type", first), ("Content-Type", second)]
        return client.post(path, content=BODY, headers=types)

    return send


def consume(method: str = "GET", query: str = "", headers: dict[str, str] | None = None) -> Send:
    def send(client: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        return client.request(method, f"/workflow/consume{query}", headers=headers)

    return send


# Sequences of requests: each runs from a fresh store on both apps.
SCENARIOS: dict[str, list[Send]] = {
    "post then consume": [post(), consume(), consume()],
    "v1 paths, POST consume": [post(path="/v1/workflow"), consume("POST")],
    "request ids": [
        post(headers={"X-Request-ID": "abc-123"}),
        consume(headers={"X-Request-ID": "bad id with spaces"}),
    ],
    "idempotency": [
        post(headers={"Idempotency-Key": "k-1"}),
        post(headers={"Idempotency-Key": "k-1"}),
        post(b'{"data": {"a": 2}}', headers={"Idempotency-Key": "k-1"}),
        post(headers={"Idempotency-Key": ""}),
        keyed_twice("k-1"),
        keyed_twice("k-2"),
    ],
    "bad bodies": [
        post(b"{"),
        post(b'{"data": 1}'),
        post(b'{"data": {"a": 1}, "extra": true}'),
        post(headers={"Content-Type": "text/plain"}),
        post(headers={"Content-Type": "application/json; charset=utf-16"}),
        post(headers={"Content-Type": 'application/json; charset="UTF-8"'}),
        typed_twice("application/json", "text/plain"),
        typed_twice("application/json", "application/json", "/v1/workflow"),
        post(b'{"data": {"a": "' + b"x" * 70_000 + b'"}}'),
        post(headers={"Content-Length": "999999"}),
        streamed(BODY, chunk=7),
        streamed(b'{"data": {"a": "' + b"x" * 70_000 + b'"}}'),
    ],
    "bad consume queries": [
        consume(query="?wait=abc"),
        consume(query="?wait=21"),
        consume(query="?other=1"),
        consume(query="?wait=0&wait=0"),
        consume(query="?wait=0.01"),
    ],
    "other routes": [post(), consume("DELETE"), post(path="/workflow/")],
    "unknown query parameters": [
        post(path="/workflow?x=1"),
        post(path="/v1/workflow?x=1&data=2"),
        post(path="/workflow?"),  # an empty query is none
        get_created("?x=1"),
        get_created("?&"),
        consume(query="?x=1"),
        get("/workflow?x=1"),
    ],
    "get one": [
        post(),
        get_created(),
        post(path="/v1/workflow"),
        get_created(headers={"X-Request-ID": "r-1"}),
        get_created("?unused=1"),
        consume(),
        get_created(),  # consumed now
        get(f"/workflow/{uuid4()}"),  # unknown
        get("/workflow/not-a-uuid"),
        get("/v1/workflow/%20"),
        get("/workflow/"),  # not the item route: the collection's, with a slash
        get_created("/csv"),  # not the item route either
        get_created("/"),
    ],
    "list": [
        post(),
        post(),
        post(path="/v1/workflow"),
        get("/workflow"),
        get("/workflow?limit=2"),
        get("/v1/workflow?limit=1&status=inserted"),
        get("/workflow?status=consumed"),
        consume(),
        get("/workflow?status=consumed&limit=1"),
        get("/workflow?dead_lettered=false&limit=2"),
        get("/workflow?dead_lettered=true"),
        get("/workflow?after=00000000-0000-0000-0000-000000000000&limit=1"),
        get("/workflow?after=ffffffff-ffff-ffff-ffff-ffffffffffff"),
        get("/workflow?limit=%31"),
        get("/workflow?status=inserted&limit=2&dead_lettered=false"),
    ],
    "bad list queries": [
        post(),
        get("/workflow?limit=0"),
        get("/workflow?limit=abc"),
        get("/workflow?limit=1001"),
        get("/workflow?status=nope"),
        get("/workflow?after=bad"),
        get("/workflow?other=1"),
        get("/workflow?limit=1&limit=2"),
        get("/workflow?dead_lettered=maybe"),
        get("/workflow?status=inserted&status="),
        get("/v1/workflow?limit=-1"),
    ],
}


async def exchange(app: Any, requests: list[Send]) -> list[tuple[int, list[Any], bytes]]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    answers = []
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for send in requests:
            response = await send(client)
            headers = [(name, mask(value)) for name, value in response.headers.raw]
            answers.append((response.status_code, headers, mask(response.content)))
    return answers


def mask(text: bytes) -> bytes:
    text = TIME.sub(b"<time>", UUID.sub(b"<uuid>", text))
    return re.sub(rb"^[0-9a-f]{32}$", b"<generated id>", text)


def apps(settings: Settings, tweak: Callable[[Container], None] | None = None) -> list[Any]:
    made = []
    for hot in (True, False):
        container = Container(settings=settings)
        if tweak:
            tweak(container)
        made.append(create_app(container, hot_routes=hot))
    return made


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(queue_backend="memory", export_dir=tmp_path / "exports", max_body_bytes=65536)


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What HotRoutes.answer returned for each request: it answered (True) or passed."""
    results: list[bool] = []
    answer = HotRoutes.answer

    async def recorded(self: HotRoutes, scope: Any, receive: Any, send: Any) -> bool:
        result = await answer(self, scope, receive, send)
        results.append(result)
        return result

    monkeypatch.setattr(HotRoutes, "answer", recorded)
    return results


@pytest.mark.parametrize("name", SCENARIOS)
async def test_hot_routes_answer_as_the_app_does(
    settings: Settings, name: str, taken: list[bool]
) -> None:
    hot, plain = apps(settings)
    assert await exchange(hot, SCENARIOS[name]) == await exchange(plain, SCENARIOS[name])
    assert any(taken), "the hot routes answered none of these requests"


async def test_the_scenarios_are_answered_by_the_hot_routes(
    settings: Settings, taken: list[bool]
) -> None:
    hot, _ = apps(settings)
    requests = [post(), get_created(), get_created("/csv"), get("/v1/workflow/x")]
    lists = [get("/workflow?limit=1"), get("/workflow/"), get("/workflow?limit=x")]
    answers = await exchange(
        hot, [*requests, *lists, consume(), consume("POST"), consume("DELETE")]
    )
    assert taken == [True, True, False, True, True, False, True, True, True, False]
    assert [status for status, _, _ in answers] == [
        201,
        200,
        200,
        422,
        200,
        404,
        422,
        200,
        204,
        405,
    ]


@pytest.mark.parametrize(
    ("error", "status"), [(DependencyUnavailable("database", "down"), 503), (KeyError("x"), 500)]
)
async def test_errors_are_answered_by_the_same_handlers(
    settings: Settings, error: Exception, status: int
) -> None:
    async def failing(*args: Any) -> None:
        raise error

    def tweak(container: Container) -> None:
        container.create_workflow.override(providers.Object(failing))
        container.consume_workflow.override(providers.Object(failing))

    hot, plain = apps(settings, tweak)
    requests = [post(), consume()]
    answers = await exchange(hot, requests)
    assert [status for status, _, _ in answers] == [status, status]
    assert answers == await exchange(plain, requests)


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer s3cret"}]
)
async def test_tokens_are_checked_as_the_app_does(
    settings: Settings, headers: dict[str, str]
) -> None:
    protected = attrs.evolve(settings, api_tokens=("s3cret",))
    hot, plain = apps(protected)
    requests = [post(headers=headers), consume(headers=headers)]
    answers = await exchange(hot, requests)
    assert answers == await exchange(plain, requests)
    expected = [201, 200] if headers.get("Authorization") == "Bearer s3cret" else [401, 401]
    assert [status for status, _, _ in answers] == expected


async def test_with_cors_every_request_goes_through_the_cors_middleware(
    settings: Settings, taken: list[bool]
) -> None:
    cors = attrs.evolve(settings, cors_origins=("https://ui.example",))
    hot, plain = apps(cors)
    requests = [post(headers={"Origin": "https://ui.example"}), post()]
    answers = await exchange(hot, requests)
    assert answers == await exchange(plain, requests)
    assert ("access-control-allow-origin", b"https://ui.example") in [
        (name.decode(), value) for name, value in answers[0][1]
    ]
    assert taken == []  # no hot routes: Starlette's CORS adds `Vary: Origin` to all


async def test_hot_routes_are_counted_under_their_route_template(settings: Settings) -> None:
    def count() -> float:
        labels = {"method": "POST", "route": "/workflow", "status": "201"}
        return REGISTRY.get_sample_value("workflows_http_requests_total", labels) or 0.0

    def got() -> float:
        labels = {"method": "GET", "route": "/v1/workflow/{uuid}", "status": "200"}
        return REGISTRY.get_sample_value("workflows_http_requests_total", labels) or 0.0

    hot, _ = apps(settings)
    before, before_got = count(), got()
    await exchange(hot, [post(), post(path="/v1/workflow"), get_created()])
    assert count() == before + 1
    assert got() == before_got + 1


class UvicornLikeReceive:
    """A receive as uvicorn's: it waits for an event unless the client has gone."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.disconnected = False

    async def __call__(self) -> dict[str, Any]:
        if not self.disconnected:
            await self.arrived.wait()
            self.arrived.clear()
        if self.disconnected:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": b"", "more_body": False}


async def test_a_ready_message_is_taken_without_waiting() -> None:
    receive = UvicornLikeReceive()
    receive.arrived.set()
    assert _ready_message(receive()) == {
        "type": "http.request",
        "body": b"",
        "more_body": False,
    }
    receive.disconnected = True
    assert _ready_message(receive()) == {"type": "http.disconnect"}


async def test_a_receive_that_would_wait_gives_nothing_and_leaves_no_waiter() -> None:
    receive = UvicornLikeReceive()
    assert _ready_message(receive()) == {}
    assert not receive.arrived._waiters  # the step was closed
    receive.arrived.set()  # a later message is still there for the next receive
    assert (await receive())["type"] == "http.request"


class NotACoroutine:
    """An awaitable that is not a coroutine (no send/throw/close), as the `receive()` of a
    server written in another language (granian) returns."""

    def __init__(self, future: asyncio.Future[dict[str, Any]]) -> None:
        self._future = future

    def __await__(self) -> NotACoroutine:
        return self

    def __iter__(self) -> NotACoroutine:
        return self

    def __next__(self) -> asyncio.Future[dict[str, Any]]:
        if self._future.done():
            raise StopIteration(self._future.result())
        self._future._asyncio_future_blocking = True  # what Future.__await__ does
        return self._future


class ForeignReceive:
    """A receive returning such awaitables, each settled by the test."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[dict[str, Any]]] = []

    def __call__(self) -> NotACoroutine:
        future = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return NotACoroutine(future)


async def test_a_receive_that_is_not_a_coroutine_is_watched_by_a_task() -> None:
    receive = ForeignReceive()
    watch = _ClientWatch(receive)  # type: ignore[arg-type]
    assert await watch.still_wanted()  # nothing came yet
    await asyncio.sleep(0)
    receive.futures[0].set_result({"type": "http.request", "body": b"", "more_body": False})
    await asyncio.sleep(0)  # the task takes the request's own message, awaits the next
    assert await watch.still_wanted()
    assert len(receive.futures) == 2
    receive.futures[1].set_result({"type": "http.disconnect"})
    await asyncio.sleep(0)
    assert not await watch.still_wanted()  # the next ask sees it: no message left unread
    assert not await watch.still_wanted()
    assert len(receive.futures) == 2


async def test_closing_the_watch_cancels_its_pending_receive() -> None:
    receive = ForeignReceive()
    watch = _ClientWatch(receive)  # type: ignore[arg-type]
    assert await watch.still_wanted()
    await asyncio.sleep(0)  # the task awaits the receive
    watch.close()
    await asyncio.sleep(0)
    assert receive.futures[0].cancelled()


async def test_the_hot_consume_answers_under_a_receive_that_is_not_a_coroutine(
    settings: Settings,
) -> None:
    """Under granian every hot consume answered 500: the disconnect check closed the
    receive's awaitable, which has no close()."""
    hot, _ = apps(settings)
    assert [status for status, _, _ in await exchange(hot, [post()])] == [201]
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    receive = ForeignReceive()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/workflow/consume",
        "raw_path": b"/workflow/consume",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }
    await hot(scope, receive, send)
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 200
    assert dict(sent[0]["headers"])[b"content-type"] == b"text/csv; charset=utf-8"
    assert sent[1]["body"].startswith(b"a,b.c")  # the CSV of BODY's data
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == {asyncio.current_task()}  # no receive left awaited

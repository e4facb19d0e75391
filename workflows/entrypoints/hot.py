"""The hot routes (POST /workflow, GET /workflow, GET|POST /workflow/consume,
GET /workflow/{uuid}) answered in plain ASGI.

On those routes Starlette's layers (its error and exception middleware, our two middleware
classes, routing, endpoint classes, Request and Response objects) cost more CPU than the
rest of the request together (docs/benchmarks.md). `HotRoutes` answers them itself, with the
behaviour the Starlette app has for them: the same handlers' logic (`http.py`), statuses,
bodies, headers in the same order (security headers, X-Request-ID, Location...), problem
documents, exception handlers, log lines and metrics. tests/unit/test_hot_routes.py sends
the same requests through both and compares the answers.

With CORS_ORIGINS set, every request goes through Starlette's CORS middleware (which also
adds `Vary: Origin` to answers without an `Origin`): the app then has no hot routes. A request
under a root path goes to the Starlette app too, as does every other route.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from starlette.datastructures import QueryParams
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from workflows.entrypoints import observability, rendering, schemas, security
from workflows.entrypoints.inputs import (
    consume_wait,
    list_query,
    next_page_link,
    no_query,
    receive_json_body,
)
from workflows.entrypoints.logs import request_id

if TYPE_CHECKING:
    from starlette.applications import Starlette

log = logging.getLogger(__name__)

Headers = dict[bytes, bytes]
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]
"""Status, raw headers (without the X-Request-ID and security headers added to all), body."""
Handler = Callable[[Scope, Receive, Headers], Awaitable[Answer]]
JSON_TYPE = (b"content-type", b"application/json")
CSV_TYPE = (b"content-type", b"text/csv; charset=utf-8")


class HotRoutes:
    def __init__(self, app: Starlette) -> None:
        self.app = app
        settings = app.state.settings
        self.container = app.state.container
        self.limit: int = settings.max_body_bytes
        self.tokens = [token.encode() for token in settings.api_tokens]
        self.routes: dict[tuple[str, str], tuple[str, Handler]] = {}
        self.items: list[tuple[str, tuple[str, Handler]]] = []  # GET {prefix}/workflow/{uuid}
        for prefix in ("", "/v1"):
            collection, consume = f"{prefix}/workflow", f"{prefix}/workflow/consume"
            self.routes[("POST", collection)] = (collection, self.create)
            self.routes[("GET", collection)] = (collection, self.list_page)
            self.routes[("GET", consume)] = (consume, self.consume)
            self.routes[("POST", consume)] = (consume, self.consume)
            self.items.append((f"{collection}/", (f"{collection}/{{uuid}}", self.item)))

    async def answer(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Answer a hot request and return True, or return False having touched nothing:
        the request is the Starlette app's."""
        found = self.routes.get((scope["method"], scope["path"]))
        if found is None and scope["method"] == "GET":
            found = self._item_route(scope["path"])
        if found is None or scope.get("root_path"):
            return False
        headers: Headers = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)  # the first of repeated headers, as Starlette
        route, handler = found
        rid = observability.new_request_id(_text(headers.get(b"x-request-id")))
        token = request_id.set(rid)
        start = time.perf_counter()
        status = 0
        try:
            try:
                problem = None
                if self.tokens:
                    sent = security.authorizations(scope)
                    problem = security.authorization_problem(self.tokens, sent)
                if problem is not None:
                    status, raw, body = _rendered(problem.response())
                else:
                    status, raw, body = await handler(scope, receive, headers)
            except ClientDisconnect:
                observability.client_gone(scope)
                return True
            except Exception as error:
                status, raw, body = await self.handled(scope, receive, error)
            raw.append((b"x-request-id", rid.encode()))
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": security.with_defaults(scope["path"], raw),
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            if status:
                observability.record(scope["method"], route, status, time.perf_counter() - start)
            request_id.reset(token)
        return True

    def _item_route(self, path: str) -> tuple[str, Handler] | None:
        """The route of GET {prefix}/workflow/{uuid}: one path segment after the prefix, as
        Starlette's `{uuid}` matches (any segment; the handler refuses a malformed uuid)."""
        for start, route in self.items:
            if path.startswith(start) and len(path) > len(start) and "/" not in path[len(start) :]:
                return route
        return None

    async def handled(self, scope: Scope, receive: Receive, error: Exception) -> Answer:
        """The app's exception handler's answer (found as Starlette finds it: by the
        error's class, most specific first)."""
        handlers = self.app.exception_handlers
        for cls in type(error).__mro__:
            if cls in handlers:
                response = await handlers[cls](Request(scope, receive), error)
                return _rendered(response)
        raise error

    async def create(self, scope: Scope, receive: Receive, headers: Headers) -> Answer:
        """WorkflowCollection.post (http.py), without the Starlette layers."""
        if scope.get("query_string"):
            no_query(scope["query_string"])
        key = None
        if (raw_key := headers.get(b"idempotency-key")) is not None:
            sent = sum(1 for name, _ in scope["headers"] if name == b"idempotency-key")
            key = schemas.parse_idempotency_key(_text(raw_key), sent)
        types = [
            value.decode("latin-1") for name, value in scope["headers"] if name == b"content-type"
        ]
        codings = None
        if b"content-encoding" in headers:  # every line of it: rare
            sent = scope["headers"]
            codings = [v.decode("latin-1") for n, v in sent if n == b"content-encoding"]
        body = await receive_json_body(
            receive, types, _text(headers.get(b"content-length")) or "", self.limit, codings=codings
        )
        if len(body) <= schemas.PARSE_ON_LOOP_MAX:
            data, steps = schemas.parse_new_workflow(body)
        else:
            client = _ClientWatch(receive)
            try:
                data, steps = await schemas.read_new_workflow(body, client.still_wanted)
            finally:
                client.close()
        created = await self.container.create_workflow()(data, steps, key)
        workflow = created.workflow
        rendered = rendering.render_workflow(workflow)
        location = f"{scope['path'].rstrip('/')}/{workflow.uuid}".encode("latin-1")
        raw = [(b"location", location)]
        if created.replayed:
            raw.append((b"idempotent-replayed", b"true"))
        raw += [(b"content-length", str(len(rendered)).encode()), JSON_TYPE]
        return 201, raw, rendered

    async def list_page(self, scope: Scope, receive: Receive, headers: Headers) -> Answer:
        """WorkflowCollection.get (http.py), without the Starlette layers."""
        status, after, limit, dead = list_query(QueryParams(scope.get("query_string", b"")))
        page = await self.container.list_workflows()(
            status=status, after=after, limit=limit, dead_lettered=dead
        )
        raw = []
        if page.more:
            link = next_page_link(scope["path"], status, limit, dead, page.workflows[-1].uuid)
            raw.append((b"link", link.encode("latin-1")))
        rendered = rendering.render_workflows(page.workflows)
        raw += [(b"content-length", str(len(rendered)).encode()), JSON_TYPE]
        return 200, raw, rendered

    async def consume(self, scope: Scope, receive: Receive, headers: Headers) -> Answer:
        """Consume.get (http.py), without the Starlette layers."""
        query = scope.get("query_string", b"")
        wait = consume_wait(QueryParams(query)) if query else 0.0
        client = _ClientWatch(receive)
        try:
            consumed = await self.container.consume_workflow()(wait, client.still_wanted)
        finally:
            client.close()
        if consumed is None:
            return 204, [], b""
        uuid = str(consumed.workflow.uuid).encode()
        content = consumed.content
        raw = [
            (b"content-disposition", b'attachment; filename="' + uuid + b'.csv"'),
            (b"x-workflow-uuid", uuid),
            (b"content-length", str(len(content)).encode()),
            CSV_TYPE,
        ]
        return 200, raw, content

    async def item(self, scope: Scope, receive: Receive, headers: Headers) -> Answer:
        """WorkflowItem.get (http.py), without the Starlette layers."""
        if scope.get("query_string"):
            no_query(scope["query_string"])
        uuid = schemas.parse_uuid(scope["path"].rpartition("/")[2], "/path/uuid")
        rendered = rendering.render_workflow(await self.container.get_workflow()(uuid))
        return 200, [(b"content-length", str(len(rendered)).encode()), JSON_TYPE], rendered


class _ClientWatch:
    """Whether a consume's client is still there, asked without waiting (`still_wanted`).

    A `receive()` that returns a coroutine (uvicorn's, hypercorn's, httpx's ASGI transport)
    is stepped once and closed where it would wait (`_ready_message`). A server may instead
    return an awaitable that is not a coroutine (granian's), which cannot be closed half-way:
    then a task receives until the client's `http.disconnect` comes, and `close()` cancels
    it when the consume is done."""

    __slots__ = ("_gone", "_receive", "_watcher")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._watcher: asyncio.Task[None] | None = None
        self._gone = False

    async def still_wanted(self) -> bool:
        if self._gone:
            return False
        watcher = self._watcher
        if watcher is None:
            receiving = self._receive()
            if isinstance(receiving, Coroutine):
                self._gone = _ready_message(receiving).get("type") == "http.disconnect"
                return not self._gone
            self._watcher = asyncio.ensure_future(_until_disconnect(receiving, self._receive))
            return True
        if watcher.done():
            self._gone = True
            if not watcher.cancelled():
                watcher.exception()  # a receive that failed: no client to answer either
        return not self._gone

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None


async def _until_disconnect(first: Awaitable[Message], receive: Receive) -> None:
    message = await first
    while message["type"] != "http.disconnect":
        message = await receive()


def _ready_message(receiving: Coroutine[Any, Any, Message]) -> Message:
    """The message a `receive()` coroutine has ready now, or {} when it would wait for one:
    one step, closed where it would suspend. What Starlette's `is_disconnected` does with a
    cancelled anyio scope, without the scope, which cost 8 % of a consume's CPU
    (bench/notes.md)."""
    try:
        receiving.send(None)
    except StopIteration as done:
        message: Message = done.value
        return message
    receiving.close()
    return {}


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _rendered(response: Response) -> Answer:
    """A Starlette Response (built by a shared handler) as status, raw headers and body."""
    return response.status_code, list(response.raw_headers), bytes(response.body)

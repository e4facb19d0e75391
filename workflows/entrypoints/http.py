"""The HTTP entrypoint: thin Starlette handlers that parse, call one use case, render."""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import orjson
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from workflows import __version__
from workflows.application.outages import Sampled
from workflows.domain.errors import (
    DependencyUnavailable,
    IdempotencyKeyReused,
    WorkflowNotFound,
)
from workflows.entrypoints import observability, rendering, schemas, security
from workflows.entrypoints.container import Container
from workflows.entrypoints.docs import docs_routes
from workflows.entrypoints.hot import HotRoutes
from workflows.entrypoints.inputs import (
    consume_wait,
    list_query,
    next_page_link,
    no_query,
    receive_json_body,
    shown,
)
from workflows.entrypoints.problems import Problem

log = logging.getLogger(__name__)
JSON = "application/json"
CSV = "text/csv; charset=utf-8"
RETRY_AFTER_SECONDS = "2"


def container_of(request: Request) -> Container:
    container: Container = request.app.state.container
    return container


def json_response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(body, status_code=status, headers=headers, media_type=JSON)


async def read_json_body(request: Request) -> bytes:
    """The body, refused before it is read when it is not JSON, too large, or its
    Content-Type is given twice."""
    limit: int = request.app.state.settings.max_body_bytes
    headers = request.headers
    return await receive_json_body(
        request.receive,
        headers.getlist("content-type"),
        headers.get("content-length", ""),
        limit,
        patch=request.method == "PATCH",
        codings=headers.getlist("content-encoding"),
    )


def _still_wanted(request: Request) -> Callable[[], Awaitable[bool]]:
    """Whether the request's client is still there (for work that waits its turn)."""

    async def still_wanted() -> bool:
        return not await request.is_disconnected()

    return still_wanted


class WorkflowCollection(HTTPEndpoint):
    async def post(self, request: Request) -> Response:
        no_query(request.scope.get("query_string", b""))
        sent = request.headers.getlist("idempotency-key")
        key = schemas.parse_idempotency_key(sent[0] if sent else None, len(sent))
        body = await read_json_body(request)
        data, steps = await schemas.read_new_workflow(body, _still_wanted(request))
        created = await container_of(request).create_workflow()(data, steps, key)
        workflow = created.workflow
        # The scope's path, not request.url: building a URL object costs more than the rest.
        headers = {"Location": f"{request.scope['path'].rstrip('/')}/{workflow.uuid}"}
        if created.replayed:
            headers["Idempotent-Replayed"] = "true"
        return json_response(rendering.render_workflow(workflow), 201, headers)

    async def get(self, request: Request) -> Response:
        status, after, limit, dead = list_query(request.query_params)
        page = await container_of(request).list_workflows()(
            status=status, after=after, limit=limit, dead_lettered=dead
        )
        headers = {}
        if page.more:
            last = page.workflows[-1].uuid
            headers["Link"] = next_page_link(request.url.path, status, limit, dead, last)
        return json_response(rendering.render_workflows(page.workflows), headers=headers)


class WorkflowItem(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        no_query(request.scope.get("query_string", b""))
        uuid = schemas.parse_uuid(request.path_params["uuid"], "/path/uuid")
        workflow = await container_of(request).get_workflow()(uuid)
        return json_response(rendering.render_workflow(workflow))

    async def patch(self, request: Request) -> Response:
        no_query(request.scope.get("query_string", b""))
        uuid = schemas.parse_uuid(request.path_params["uuid"], "/path/uuid")
        body = await read_json_body(request)
        status = await schemas.read_status_patch(body, _still_wanted(request))
        workflow = await container_of(request).update_status()(uuid, status)
        return json_response(rendering.render_workflow(workflow))


class WorkflowCsv(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        no_query(request.scope.get("query_string", b""))
        uuid = schemas.parse_uuid(request.path_params["uuid"], "/path/uuid")
        content = await container_of(request).export_workflow()(uuid)
        return Response(content, media_type=CSV, headers=attachment(str(uuid)))


class Consume(HTTPEndpoint):
    """GET and POST take a workflow. HEAD, which Starlette answers with `get` wherever
    there is one, is a 405 here: a HEAD must be safe, and this one would take a workflow
    and throw its CSV away."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        super().__init__(scope, receive, send)
        self._allowed_methods = [m for m in self._allowed_methods if m != "HEAD"]

    async def get(self, request: Request) -> Response:
        wait = consume_wait(request.query_params)

        async def still_wanted() -> bool:
            return not await request.is_disconnected()

        consumed = await container_of(request).consume_workflow()(wait, still_wanted)
        if consumed is None:
            return Response(status_code=204)
        uuid = str(consumed.workflow.uuid)
        headers = attachment(uuid) | {"X-Workflow-UUID": uuid}
        return Response(consumed.content, media_type=CSV, headers=headers)

    post = get


def attachment(uuid: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{uuid}.csv"'}


async def healthz(request: Request) -> Response:
    return json_response(b'{"status":"ok"}')


RECOVERING = "checking the export files written since the last flush (after a crash)"


async def readyz(request: Request) -> Response:
    container = container_of(request)
    failing: dict[str, str] = request.app.state.failing_checks
    # Side by side: each check may wait its dependency's timeout (5 s), and in turn two
    # hanging ones took twice that.
    pings = {
        "database": container.repository().ping,
        "queue": container.queue().ping,
        "exports": container.exporter().ping,
    }
    passed = await asyncio.gather(*(_check(name, ping, failing) for name, ping in pings.items()))
    checks = dict(zip(pings, passed, strict=True))
    if checks["exports"] == "ok" and not container.export_flusher().recovered:
        checks["exports"] = RECOVERING
    # The queue alone failing is the broker (the postgres queue is the database): POSTs
    # wait in the outbox and consumes take from the database, so every request is served.
    if checks["database"] != "ok" or checks["exports"] != "ok":
        status = "not ready"
    else:
        status = "ready" if checks["queue"] == "ok" else "degraded"
    body = orjson.dumps({"status": status, "checks": checks})
    if status != "not ready":
        return json_response(body)
    return json_response(body, 503, {"Retry-After": RETRY_AFTER_SECONDS})


async def _check(name: str, ping: Callable[[], Awaitable[None]], failing: dict[str, str]) -> str:
    """`ok`, or `unavailable` with the reason logged only: /readyz is public, and the
    reason (a broker's address, a directory's path, a library's error) is the operator's.
    Logged when a check starts failing (or fails for another reason) and when it passes
    again, not at every probe: `failing` holds the process's failing checks' reasons."""
    try:
        await ping()
    except DependencyUnavailable as exc:
        if failing.get(name) != str(exc):
            failing[name] = str(exc)
            log.warning("readiness: the %s check failed: %s", name, exc)
        return "unavailable"
    if failing.pop(name, None) is not None:
        log.info("readiness: the %s check passes again", name)
    return "ok"


async def version(request: Request) -> Response:
    no_query(request.scope.get("query_string", b""))
    commit = request.app.state.settings.commit
    return json_response(orjson.dumps({"version": __version__, "commit": commit}))


def workflow_routes(prefix: str) -> list[BaseRoute]:
    return [
        Route(f"{prefix}/workflow", WorkflowCollection),
        Route(f"{prefix}/workflow/consume", Consume),
        Route(f"{prefix}/workflow/{{uuid}}", WorkflowItem),
        Route(f"{prefix}/workflow/{{uuid}}/csv", WorkflowCsv),
        Route(f"{prefix}/version", version, methods=["GET"]),
    ]


async def problem_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return exc.response()


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = {
        404: f"no resource at {shown(request.url.path, 200)}",
        405: f"{request.method} is not allowed here",
    }
    headers = dict(exc.headers or {})
    if "Allow" in headers:  # a function route's methods are a set: its order varies
        allowed = {method.strip() for method in headers["Allow"].split(",")}
        headers["Allow"] = ", ".join(sorted(allowed, key=lambda m: _METHOD_RANK.get(m, 99)))
    problem = Problem(
        exc.status_code, detail.get(exc.status_code, str(exc.detail)), headers=headers
    )
    return problem.response()


_METHOD_RANK = {m: i for i, m in enumerate(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"))}


async def not_found_handler(request: Request, exc: Exception) -> Response:
    return Problem(404, str(exc)).response()


async def key_reused_handler(request: Request, exc: Exception) -> Response:
    errors = [{"pointer": "/header/Idempotency-Key", "message": "names a different request"}]
    return Problem(422, str(exc), errors=errors, slug="idempotency-key-reused").response()


async def unavailable_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DependencyUnavailable)
    # The first 503 for a dependency, then a line every 10 s with how many were not
    # logged: an outage under load would otherwise log a line per request.
    request.app.state.unavailable_log.happened(exc.dependency, "answering 503: %s", exc)
    detail = (
        f"the {exc.dependency} is unavailable; retry later (a POST retried with the same "
        "Idempotency-Key is never stored twice)"
    )
    return Problem(503, detail, headers={"Retry-After": RETRY_AFTER_SECONDS}).response()


async def error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return Problem(500, "an unexpected error occurred; it has been logged").response()


class WorkflowsApp(Starlette):
    """The Starlette app, but for the hot routes, which `HotRoutes` answers in plain ASGI
    (hot.py) when `hot_routes` is on and CORS is off."""

    hot: HotRoutes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path")
            if raw and b"%2" in raw:
                scope["path"] = _encoded_slashes_kept(raw) or scope["path"]
            if self.hot is not None:
                scope["app"] = self
                if await self.hot.answer(scope, receive, send):
                    return
        await super().__call__(scope, receive, send)


_ENCODED_SLASH = re.compile("(%2[fF])")


def _encoded_slashes_kept(raw_path: bytes) -> str | None:
    """The path decoded but for its encoded slashes (`%2F`), which stay as sent; None when it
    has none. The server decodes them all, so `/workflow%2Fconsume` would be routed as
    `/workflow/consume`: a path with another meaning (RFC 3986: `%2F` is data within a
    segment, not a separator) reaching a route that proxies and firewalls in front of the
    service know by a different name. Kept, it names no route: a 404."""
    parts = _ENCODED_SLASH.split(raw_path.partition(b"?")[0].decode("latin-1"))
    if len(parts) == 1:
        return None
    return "".join(part if i % 2 else urllib.parse.unquote(part) for i, part in enumerate(parts))


def create_app(
    container: Container,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
    *,
    hot_routes: bool = True,
) -> Starlette:
    settings = container.settings()
    app = WorkflowsApp(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", observability.metrics, methods=["GET"]),
            *workflow_routes(""),
            *workflow_routes("/v1"),
            *docs_routes(),
        ],
        exception_handlers={
            Problem: problem_handler,
            HTTPException: http_exception_handler,
            WorkflowNotFound: not_found_handler,
            IdempotencyKeyReused: key_reused_handler,
            DependencyUnavailable: unavailable_handler,
            Exception: error_handler,
        },
        # Outermost first: headers on every response, the 500s too (which the request
        # middleware renders, so that they carry the request id), then CORS and tokens.
        middleware=[
            Middleware(security.SecurityHeadersMiddleware),
            Middleware(observability.RequestMiddleware),
            *security.access_control(settings),
        ],
        lifespan=lifespan or _no_lifespan,
    )
    app.router.redirect_slashes = False  # /workflow/ is an unknown path: 404, not a 307
    app.state.container = container
    app.state.settings = settings
    app.state.failing_checks = {}  # /readyz: each failing check's reason, logged once
    app.state.unavailable_log = Sampled(log)  # the 503s, logged once per 10 s
    if hot_routes and not settings.cors_origins:  # CORS: see hot.py
        app.hot = HotRoutes(app)
    return app


@asynccontextmanager
async def _no_lifespan(app: Starlette) -> AsyncIterator[None]:
    yield

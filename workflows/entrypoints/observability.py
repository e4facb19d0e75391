"""Prometheus metrics, and the request middleware that gives each request its id.

With several uvicorn workers each process writes its samples to files under
PROMETHEUS_MULTIPROC_DIR (`workflows serve` creates and empties it) and a scrape of any
worker adds them all up. That variable must be set before prometheus_client is imported,
which is why only the app (never the CLI) imports this module.

Figures that are global rather than per process (queue depth, outbox backlog) are read at
scrape time from the database or broker, by whichever worker answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workflows.application.outages import Sampled
from workflows.entrypoints.logs import request_id
from workflows.entrypoints.operations import MULTIPROC_DIR, Snapshot, snapshot

log = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"[A-Za-z0-9._~:+/=-]{1,128}")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CONSUME_ROUTES = frozenset({"/workflow/consume", "/v1/workflow/consume"})
CONSUME_OUTCOMES = {200: "consumed", 204: "empty"}
POOL_SAMPLE_INTERVAL = 5.0

# No `_created` series: multiprocess mode has none, so neither does a single process.
disable_created_metrics()  # type: ignore[no-untyped-call]

REQUESTS = Counter(
    "workflows_http_requests_total",
    "HTTP requests answered, by method, route template and status.",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "workflows_http_request_duration_seconds",
    "Time to answer an HTTP request, by method, route template and status.",
    ["method", "route", "status"],
    # Up to 30 s: a long-polling consume (?wait=) may hold its request for 20.
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30),
)
CONSUMES = Counter(
    "workflows_consume_total",
    "Consume calls: consumed (a workflow handed out), empty (204) or error (5xx).",
    ["outcome"],
)
for _outcome in ("consumed", "empty", "error"):
    CONSUMES.labels(_outcome)
UNREAD = Counter(
    "workflows_http_unread_answers_total",
    "Connections closed because their client took none of an answer for 60 s.",
)
SLOW_ANSWERS = Counter(
    "workflows_http_slow_answers_total",
    "Connections closed because their client took an answer at under 1 MiB a minute.",
)
# Each process sets its own pool's figures; a scrape sums those of the live processes.
POOL_CONNECTIONS = Gauge(
    "workflows_db_pool_connections",
    "Open PostgreSQL connections of the API processes, idle or in use.",
    ["state"],
    multiprocess_mode="livesum",
)
POOL_MAX = Gauge(
    "workflows_db_pool_max_connections",
    "The most PostgreSQL connections the API processes may open (DB_POOL_SIZE each).",
    multiprocess_mode="livesum",
)
POOL_WAITING = Gauge(
    "workflows_db_pool_requests_waiting",
    "Requests waiting for a PostgreSQL connection.",
    multiprocess_mode="livesum",
)
QUEUE_HELD = Gauge(
    "workflows_queue_held",
    "Queued messages the API processes hold ahead of their consumes (rabbitmq,"
    " up to RABBITMQ_PREFETCH each); workflows_queue_depth does not count them.",
    multiprocess_mode="livesum",
)


class RequestMiddleware:
    """Gives each HTTP request an id (its valid `X-Request-ID`, or a new one) that every
    log line of the request carries and the response echoes, and counts and times it.

    It also answers an unhandled error itself, with the app's handler for `Exception`,
    so that the 500 carries the id and the headers like any other response and its log
    line the id (Starlette's own last-resort handler runs outside every middleware).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id(Headers(scope=scope).get("x-request-id"))
        token = request_id.set(rid)
        status = 0
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            client_gone(scope)
        except Exception as error:
            handler = getattr(scope.get("app"), "exception_handlers", {}).get(Exception)
            if status or handler is None:
                status = status or 500
                raise
            response = await handler(Request(scope, receive), error)
            await response(scope, receive, send_with_id)
        finally:
            if status:  # not a request abandoned before any answer (cancelled)
                observe(scope, status, time.perf_counter() - start)
            request_id.reset(token)


def client_gone(scope: Scope) -> None:
    """A request whose body stopped before its end, as far as the app can tell: the client
    closed its connection, or its body stopped arriving and the server answered it 408
    itself (http_protocol.py). No one to answer, nothing done: neither an error nor an
    answered request."""
    log.info(
        "%s %s: the request's body did not all arrive (the client went away, or was "
        "answered 408 for a late body)",
        scope["method"],
        scope["path"],
    )


_refusals = Sampled(log, level=logging.INFO)


def refused(scope: Scope | None, status: int, detail: str, rid: str) -> None:
    """A request the server answered itself (http_protocol.py: a 400 for a head it cannot
    parse, without one valid Host, in HTTP/0.9 or with a transfer coding other than chunked,
    a 431, a 408): counted in
    workflows_http_requests_total, with its method and route when its head was read
    (`scope`), else OTHER and `unmatched`, but not timed (the server never had all of it);
    logged at INFO, once per 10 s per status with how many since (a client that trickles
    or garbles is not the service's failure)."""
    method = "OTHER"
    route = "unmatched"
    if scope is not None:
        method = scope["method"] if scope["method"] in METHODS else "OTHER"
        route = route_template(scope)
    REQUESTS.labels(method, route, str(status)).inc()
    _refusals.happened(str(status), "answered %d itself (X-Request-ID %s): %s", status, rid, detail)


_unread = Sampled(log, level=logging.INFO)


def unread(seconds: float, unsent: int) -> None:
    """A connection closed by the server because its client read none of its answer for
    `seconds` (http_protocol.UNREAD_TIMEOUT): counted, and logged at INFO once per 10 s with
    how many since (the client's failure, not the service's)."""
    UNREAD.inc()
    _unread.happened(
        "unread",
        "closed a connection whose client read none of its answer for %g s (%d bytes unsent)",
        seconds,
        unsent,
    )


_slow = Sampled(log, level=logging.INFO)


def slow_answer(rate: float, unsent: int) -> None:
    """A connection closed by the server because its client took its answer at under
    http_protocol.ANSWER_MIN_RATE: counted, and logged at INFO once per 10 s with how many
    since."""
    SLOW_ANSWERS.inc()
    _slow.happened(
        "slow",
        "closed a connection whose client took its answer at %.0f bytes/s (%d bytes unsent)",
        rate,
        unsent,
    )


def new_request_id(given: str | None) -> str:
    """The client's X-Request-ID when it is a valid one, else a new random id."""
    if given and REQUEST_ID.fullmatch(given):
        return given
    # 128 random bits; `random` is reseeded in every process, and is cheaper than uuid4.
    return f"{random.getrandbits(128):032x}"


def observe(scope: Scope, status: int, seconds: float) -> None:
    method = scope["method"] if scope["method"] in METHODS else "OTHER"
    record(method, route_template(scope), status, seconds)


def record(method: str, route: str, status: int, seconds: float) -> None:
    """Count and time one answered request of a known method and route template."""
    count, latency = _series(method, route, status)
    count.inc()
    latency.observe(seconds)
    if route in CONSUME_ROUTES and (status in CONSUME_OUTCOMES or status >= 500):
        CONSUMES.labels(CONSUME_OUTCOMES.get(status, "error")).inc()


@functools.cache  # bounded: the labels take a bounded set of values
def _series(method: str, route: str, status: int) -> tuple[Counter, Histogram]:
    labels = (method, route, str(status))
    return REQUESTS.labels(*labels), LATENCY.labels(*labels)


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/workflow/{uuid}`), never the raw path, so the
    label has a bounded set of values; `unmatched` for a path no route serves."""
    route = scope.get("route")
    if route is None:  # answered before routing (a 401, a CORS preflight), or a 404
        routes = getattr(scope.get("app"), "routes", ())
        route = next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class SnapshotCollector:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        if self.snap.queue_depth is not None:
            depth = GaugeMetricFamily(
                "workflows_queue_depth",
                "Workflows waiting to be consumed (rabbitmq: messages ready in the broker).",
                labels=["backend"],
            )
            depth.add_metric([self.snap.backend], self.snap.queue_depth)
            yield depth
        if self.snap.dead_letters is not None:
            yield GaugeMetricFamily(
                "workflows_dead_letters",
                "Workflows parked after MAX_DELIVERY_ATTEMPTS failed consumes.",
                value=self.snap.dead_letters,
            )
        if self.snap.outbox is not None:
            yield GaugeMetricFamily(
                "workflows_outbox_backlog",
                "Outbox entries the broker has not confirmed yet.",
                value=self.snap.outbox.entries,
            )
            yield GaugeMetricFamily(
                "workflows_outbox_oldest_age_seconds",
                "Age of the oldest outbox entry (0 when the outbox is empty).",
                value=self.snap.outbox.oldest_age_seconds,
            )


def sample_process(container: Any) -> None:
    """Record this process's connection pool figures and the messages it holds."""
    backend = container.settings().queue_backend
    if backend == "memory":
        return
    if backend == "rabbitmq":
        QUEUE_HELD.set(container.broker().held)
    stats: dict[str, int] = container.pool().get_stats()
    size, idle = stats.get("pool_size", 0), stats.get("pool_available", 0)
    POOL_CONNECTIONS.labels("idle").set(idle)
    POOL_CONNECTIONS.labels("in_use").set(max(0, size - idle))
    POOL_MAX.set(stats.get("pool_max", 0))
    POOL_WAITING.set(stats.get("requests_waiting", 0))


@contextlib.asynccontextmanager
async def sampling(container: Any, interval: float = POOL_SAMPLE_INTERVAL) -> AsyncIterator[None]:
    """Sample the pool and the held messages every `interval` seconds while the app runs
    (a scrape samples its own process too); on the way out, take this process's live
    gauges out of the sums."""

    async def loop() -> None:
        while True:
            sample_process(container)
            await asyncio.sleep(interval)

    task = asyncio.create_task(loop(), name="pool-sampler")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if directory := os.environ.get(MULTIPROC_DIR):
            mark_process_dead(os.getpid(), directory)  # type: ignore[no-untyped-call]


def scrape_registry(snap: Snapshot) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    directory = os.environ.get(MULTIPROC_DIR)
    if directory:
        forget_dead_processes(Path(directory))
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    else:
        registry.register(REGISTRY)
    registry.register(SnapshotCollector(snap))
    return registry


def forget_dead_processes(directory: Path) -> None:
    """Drop the live gauges of workers that died without cleaning up (killed, crashed)."""
    for file in directory.glob("gauge_live*_*.db"):
        pid = int(file.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
        except PermissionError:
            pass  # alive, another user's


SNAPSHOT_TTL = 1.0
"""Seconds a process's snapshot (queue depth, dead letters) serves every scrape, but with
the rabbitmq backend: each read counts queued rows (a cost audit: 25 ms of PostgreSQL's CPU
per scrape at 300,000 queued; 16 clients scraping the public /metrics kept a core busy and
took POSTs from 2.5 to 130 ms). Concurrent scrapes share one read. With rabbitmq the depth
is the broker's, read at each scrape, so that it adds up with workflows_queue_held, which
is always current."""


async def metrics(request: Request) -> Response:
    container = request.app.state.container
    sample_process(container)
    registry = scrape_registry(await _recent_snapshot(request.app.state, container))
    body = await asyncio.to_thread(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def _recent_snapshot(state: Any, container: Any) -> Snapshot:
    """The snapshot read within SNAPSHOT_TTL, or being read now, else a new one (rabbitmq:
    always a new one)."""
    if container.settings().queue_backend == "rabbitmq":
        return await snapshot(container)
    recent: tuple[float, asyncio.Future[Snapshot]] | None = getattr(state, "snapshot", None)
    now = time.monotonic()
    if recent is None or now - recent[0] >= SNAPSHOT_TTL:
        recent = (now, asyncio.ensure_future(snapshot(container)))
        state.snapshot = recent
    return await asyncio.shield(recent[1])  # a scrape whose client leaves cancels only itself

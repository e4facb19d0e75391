"""What operating the service needs beyond serving: `workflows stats`, `relay`, `prune`,
the figures /metrics reads at scrape time, and the metrics directory of `serve`.

Free of prometheus_client, like everything the CLI imports (see observability.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sized
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import orjson

from workflows.adapters.memory import InMemoryWorkflowRepository
from workflows.adapters.postgres.database import ping_database
from workflows.adapters.postgres.stats import OutboxBacklog, PostgresStats
from workflows.adapters.rabbitmq.peek import QueueMissing, queue_depth
from workflows.application.outages import Outage
from workflows.application.pruning import Pruned, PruneWorkflows
from workflows.domain.errors import DependencyUnavailable
from workflows.entrypoints.config import ConfigError, Settings, age_text, parse_age
from workflows.entrypoints.container import Container, running

log = logging.getLogger(__name__)
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
STATS_TIMEOUT = 4.0


@attrs.frozen
class Snapshot:
    """Global figures, whichever process reads them; None for one that could not be read."""

    backend: str
    queue_depth: int | None
    outbox: OutboxBacklog | None
    dead_letters: int | None = None


async def snapshot(
    container: Any, broker_depth: Callable[[], Awaitable[int]] | None = None
) -> Snapshot:
    """Queue depth (rabbitmq: messages ready in the broker, read by `broker_depth` or the
    container's broker; postgres: queued rows; memory: this process's queue), dead letters
    and, with rabbitmq, the outbox backlog."""
    backend: str = container.settings().queue_backend
    depth: int | None = None
    outbox: OutboxBacklog | None = None
    dead: int | None = None
    with _unless_unavailable("queue depth"):
        if backend == "memory":
            queue = container.queue()
            depth = len(queue) if isinstance(queue, Sized) else None
        elif backend == "postgres":
            depth = await asyncio.wait_for(_stats(container).queue_depth(), STATS_TIMEOUT)
        else:
            read = container.broker().depth if broker_depth is None else broker_depth
            depth = await asyncio.wait_for(read(), STATS_TIMEOUT)
    if backend != "memory":
        with _unless_unavailable("dead letters"):
            dead = await asyncio.wait_for(_stats(container).dead_letters(), STATS_TIMEOUT)
    if backend == "rabbitmq":
        with _unless_unavailable("outbox backlog"):
            outbox = await asyncio.wait_for(_stats(container).outbox(), STATS_TIMEOUT)
    return Snapshot(backend, depth, outbox, dead)


def _stats(container: Any) -> PostgresStats:
    return PostgresStats(container.pool())


# Read at every scrape: a figure that cannot be read is logged when that starts (or its
# reason changes) and when it can be read again, not at each scrape.
_UNREAD: dict[str, Outage] = {}


@contextlib.contextmanager
def _unless_unavailable(what: str) -> Iterator[None]:
    """The figure is left out (None) when it cannot be read, whatever the reason: a scrape
    gives every figure it can, never a 500 for one it cannot."""
    unread = _UNREAD.get(what) or _UNREAD.setdefault(
        what, Outage(log, f"{what} could not be read: %s", f"{what} read again")
    )
    try:
        yield
    except TimeoutError:
        unread.failed(f"no answer within {STATS_TIMEOUT:g} s")
    except DependencyUnavailable as error:
        unread.failed(error)
    except QueueMissing as missing:
        unread.failed(
            f"the broker has no queue {str(missing)!r} (check RABBITMQ_QUEUE; "
            "the service declares it when it starts)"
        )
    except Exception as error:  # a schema that is not there (UndefinedTable), say
        unread.failed(f"{type(error).__name__}: {error}")
    else:
        unread.passed()


def stats(settings: Settings, *, as_json: bool) -> int:
    """Print queue depth, outbox backlog, workflows by status and the oldest consume."""
    if settings.queue_backend == "memory":
        print(
            "workflows stats: QUEUE_BACKEND=memory keeps its queue inside the serving process",
            file=sys.stderr,
        )
        return 2
    report = asyncio.run(_gather_stats(_not_consuming(settings)))
    if as_json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0
    outbox = report["outbox"]
    by_status = ", ".join(f"{status} {n}" for status, n in report["workflows"].items())
    print(f"queue backend   {report['backend']}")
    print(f"queue depth     {_or_unknown(report['queue_depth'])}")
    print(f"dead letters    {_or_unknown(report['dead_letters'])}")
    if report["backend"] == "rabbitmq":
        backlog = (
            "unknown"
            if outbox is None
            else (f"{outbox['entries']} (oldest {outbox['oldest_age_seconds']:.1f} s)")
        )
        print(f"outbox backlog  {backlog}")
    print(f"workflows       {by_status or 'none'}")
    print(f"oldest consumed {_oldest(report['oldest_consumed_at'])}")
    return 0


def _oldest(at: str | None) -> str:
    if at is None:
        return "none"
    days = (datetime.now(UTC) - datetime.fromisoformat(at)).total_seconds() / 86400
    return f"{at} ({days:.1f} days ago)"


async def _gather_stats(settings: Settings) -> dict[str, Any]:
    container = Container(settings=settings)
    async with AsyncExitStack() as stack:  # the database only: no relay, no housekeeping
        database = container.database()
        stack.push_async_callback(database.stop)
        await database.start()
        # A database never migrated: one line, as an unreachable one (not the figures it
        # can read, then a traceback for the first it cannot).
        await ping_database(container.pool(), schema=True)
        snap = await snapshot(container, functools.partial(_peek_depth, settings))
        by_status = await _stats(container).counts_by_status()
        oldest = await _stats(container).oldest_consumed()
    outbox = None if snap.outbox is None else attrs.asdict(snap.outbox)
    return {
        "backend": snap.backend,
        "queue_depth": snap.queue_depth,
        "dead_letters": snap.dead_letters,
        "outbox": outbox,
        "workflows": by_status,
        "oldest_consumed_at": None if oldest is None else oldest.isoformat(),
    }


async def _peek_depth(settings: Settings) -> int:
    """The broker queue's depth, declaring nothing: a mistyped RABBITMQ_QUEUE must not
    create a queue (nor fix a new one's arguments from this process's settings)."""
    assert settings.rabbitmq_url is not None
    return await asyncio.to_thread(
        queue_depth, settings.rabbitmq_url, settings.rabbitmq_queue, timeout=STATS_TIMEOUT
    )


def _or_unknown(value: object) -> str:
    return "unknown" if value is None else str(value)


def relay(settings: Settings) -> int:
    """Run the outbox relay alone until SIGINT or SIGTERM."""
    if settings.queue_backend != "rabbitmq":
        print(
            f"workflows relay: only QUEUE_BACKEND=rabbitmq has an outbox "
            f"(this one is {settings.queue_backend})",
            file=sys.stderr,
        )
        return 2
    asyncio.run(_relay(_not_consuming(settings)))
    return 0


def age(text: str) -> timedelta:
    """An AGE of `workflows prune` (config.parse_age), for argparse."""
    try:
        return parse_age(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def prune(
    settings: Settings,
    *,
    workflows_older_than: timedelta | None,
    exports_older_than: timedelta | None,
    dry_run: bool,
) -> int:
    """Delete consumed workflows and export files older than their ages (pruning.py)."""
    if workflows_older_than is not None and settings.queue_backend == "memory":
        print(
            "workflows prune: QUEUE_BACKEND=memory keeps its workflows inside the serving "
            "process (only --exports-older-than applies)",
            file=sys.stderr,
        )
        return 2
    pruned = asyncio.run(
        _prune(settings, workflows_older_than, exports_older_than, dry_run=dry_run)
    )
    verb = "would delete" if dry_run else "deleted"
    if workflows_older_than is not None:
        with_them = "" if dry_run else f", and {pruned.their_exports} export files of theirs"
        print(
            f"workflows  {verb} {pruned.workflows} consumed more than "
            f"{age_text(workflows_older_than)} ago{with_them}"
        )
    if exports_older_than is not None:
        print(
            f"exports    {verb} {pruned.exports} files written more than "
            f"{age_text(exports_older_than)} ago ({settings.export_dir})"
        )
    return 0


async def _prune(
    settings: Settings,
    workflows_older_than: timedelta | None,
    exports_older_than: timedelta | None,
    *,
    dry_run: bool,
) -> Pruned:
    container = Container(settings=settings)
    async with AsyncExitStack() as stack:  # the database only, and only for workflows
        exporter = container.exporter()
        stack.callback(exporter.close)
        if workflows_older_than is None:
            # Exports alone: no repository is asked anything, and none is made (without
            # DATABASE_URL, the container's would fail to build: a traceback).
            pruning = PruneWorkflows(InMemoryWorkflowRepository(), exporter, container.clock())
        else:
            database = container.database()
            stack.push_async_callback(database.stop)
            await database.start()
            await ping_database(container.pool(), schema=True)
            pruning = container.prune_workflows()
        return await pruning(
            workflows_older_than=workflows_older_than,
            exports_older_than=exports_older_than,
            dry_run=dry_run,
        )


def _not_consuming(settings: Settings) -> Settings:
    """The settings of a process that never consumes (`stats`, `relay`): no prefetching
    consumer, which would hold messages it never hands out, hide them from the depth, and
    publish them anew, at the back of the queue, when the process stops."""
    return attrs.evolve(settings, rabbitmq_prefetch=0)


async def _relay(settings: Settings) -> None:
    # Unreachable at start: one line and status 1, as every command (not a relay that
    # retries for ever); once running, it rides out an outage like the service.
    probe = Container(settings=settings).database()
    pool_log = logging.getLogger("psycopg.pool")
    level = pool_log.level
    pool_log.setLevel(logging.ERROR)  # not a WARNING at each of the pool's attempts first
    try:
        await probe.start()
    finally:
        pool_log.setLevel(level)
        await probe.stop()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running(Container(settings=settings)):
        log.info(
            "outbox relay running on queue %r; SIGINT or SIGTERM stops it", settings.rabbitmq_queue
        )
        await stop.wait()
    log.info("outbox relay stopped")


@contextlib.contextmanager
def metrics_directory() -> Iterator[Path]:
    """PROMETHEUS_MULTIPROC_DIR for the workers of `serve`: the one configured, emptied of
    a previous run's files, or else a new temporary one, removed afterwards. Set in the
    environment before any worker starts (and before prometheus_client is imported)."""
    configured = os.environ.get(MULTIPROC_DIR, "").strip()
    if configured:
        path = Path(configured)
        try:
            path.mkdir(parents=True, exist_ok=True)
            for stale in path.glob("*.db"):
                stale.unlink()
        except OSError as error:
            raise ConfigError(
                f"{MULTIPROC_DIR} must be a directory this process can write: {error}"
            ) from None
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="workflows-metrics-") as created:
        os.environ[MULTIPROC_DIR] = created
        try:
            yield Path(created)
        finally:
            os.environ.pop(MULTIPROC_DIR, None)

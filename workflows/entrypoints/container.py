"""The composition root: which adapter implements each port, chosen by configuration."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta

from dependency_injector import containers, providers

from workflows.adapters.csv_export import CsvExporter
from workflows.adapters.memory import InMemoryQueue, InMemoryWorkflowRepository
from workflows.adapters.postgres import (
    PostgresDatabase,
    PostgresDoorbell,
    PostgresOutbox,
    PostgresQueue,
    PostgresWorkflowRepository,
)
from workflows.adapters.rabbitmq import RabbitMqBroker, RabbitMqQueue
from workflows.application.doorbell import Doorbell
from workflows.application.flusher import ExportFlusher
from workflows.application.outages import Outage
from workflows.application.pruning import PruneWorkflows
from workflows.application.relay import OutboxRelay
from workflows.application.use_cases import (
    ConsumeWorkflow,
    CreateWorkflow,
    ExportWorkflow,
    GetWorkflow,
    ListWorkflows,
    UpdateStatus,
)
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.ids import uuid7
from workflows.entrypoints.config import Settings, age_text

log = logging.getLogger(__name__)
HOUSEKEEPING_EVERY = 600.0
"""Seconds between two rounds of housekeeping (expired keys, retention) of a process."""


def utc_now() -> datetime:
    return datetime.now(UTC)


class Container(containers.DeclarativeContainer):
    settings = providers.Dependency(instance_of=Settings)
    backend = providers.Callable(lambda s: s.queue_backend, settings)
    clock = providers.Object(utc_now)
    new_id = providers.Object(uuid7)

    database = providers.Singleton(
        lambda s: PostgresDatabase(s.database_url, min_size=1, max_size=s.pool_size), settings
    )
    pool = database.provided.pool
    outbox = providers.Singleton(PostgresOutbox, pool)
    # The broker's own delivery limit is a safety net for crash loops (a consume that
    # dies before it can count its failure); failed exports are counted exactly, at
    # MAX_DELIVERY_ATTEMPTS, by the consume use case.
    broker = providers.Singleton(
        lambda s: RabbitMqBroker(
            s.rabbitmq_url,
            queue=s.rabbitmq_queue,
            arguments={"x-delivery-limit": 2 * s.max_delivery_attempts},
            prefetch=s.rabbitmq_prefetch,
        ),
        settings,
    )
    postgres_doorbell = providers.Singleton(
        lambda s, pool: PostgresDoorbell(s.database_url, pool), settings, pool
    )
    doorbell = providers.Selector(
        backend,
        memory=providers.Singleton(Doorbell),
        postgres=postgres_doorbell,
        rabbitmq=postgres_doorbell,
    )
    relay = providers.Singleton(
        lambda outbox, broker, s, doorbell: OutboxRelay(
            outbox, broker, confirm_timeout=s.confirm_timeout, doorbell=doorbell
        ),
        outbox,
        broker,
        settings,
        doorbell,
    )

    repository = providers.Selector(
        backend,
        memory=providers.Singleton(InMemoryWorkflowRepository),
        # A consume's row put back because its caller left rings, as a new one would.
        postgres=providers.Singleton(
            PostgresWorkflowRepository,
            pool,
            outbox=False,
            returned=postgres_doorbell.provided.ring,
        ),
        rabbitmq=providers.Singleton(
            PostgresWorkflowRepository, pool, outbox=True, returned=postgres_doorbell.provided.ring
        ),
    )
    postgres_queue = providers.Singleton(
        PostgresQueue, pool, returned=postgres_doorbell.provided.ring
    )
    queue = providers.Selector(
        backend,
        memory=providers.Singleton(InMemoryQueue, repository),
        postgres=postgres_queue,
        rabbitmq=providers.Singleton(
            lambda repository, broker, relay, s, rows: RabbitMqQueue(
                repository, broker, relay, rows, wait_for_confirm=s.confirm_timeout > 0
            ),
            repository,
            broker,
            relay,
            settings,
            postgres_queue,
        ),
    )
    exporter = providers.Singleton(
        lambda s: CsvExporter(s.export_dir, flush_behind=s.export_flush_interval > 0), settings
    )

    create_workflow = providers.Singleton(
        lambda repository, queue, clock, new_id, s, doorbell: CreateWorkflow(
            repository, queue, clock, new_id, timedelta(seconds=s.idempotency_ttl), doorbell
        ),
        repository,
        queue,
        clock,
        new_id,
        settings,
        doorbell,
    )
    get_workflow = providers.Singleton(GetWorkflow, repository)
    list_workflows = providers.Singleton(
        lambda repository, s: ListWorkflows(repository, s.list_page_bytes), repository, settings
    )
    update_status = providers.Singleton(UpdateStatus, repository, queue, clock, doorbell)
    consume_workflow = providers.Singleton(
        lambda queue, exporter, clock, doorbell, repository, s: ConsumeWorkflow(
            queue, exporter, clock, doorbell, repository, s.max_delivery_attempts
        ),
        queue,
        exporter,
        clock,
        doorbell,
        repository,
        settings,
    )
    export_workflow = providers.Singleton(ExportWorkflow, repository, exporter)
    prune_workflows = providers.Singleton(PruneWorkflows, repository, exporter, clock)
    export_flusher = providers.Singleton(
        lambda repository, exporter, s: ExportFlusher(
            repository,
            exporter,
            s.export_flush_interval or 1.0,
            needs_recovery=s.queue_backend != "memory",
        ),
        repository,
        exporter,
        settings,
    )


@asynccontextmanager
async def running(container: Container) -> AsyncIterator[None]:
    """Start the adapters the configuration chose (and only those), stop them after.

    A dependency that is down at start-up does not stop the service: it answers 503 for
    what needs it (and /readyz says not ready) until the dependency is back.
    """
    settings: Settings = container.settings()
    backend = settings.queue_backend
    async with AsyncExitStack() as stack:
        if backend == "memory":
            log.warning("QUEUE_BACKEND=memory: every workflow is lost when this process exits")
        else:
            database = container.database()
            stack.push_async_callback(database.stop)
            await _start_tolerantly("database", database.start)
            doorbell = container.postgres_doorbell()
            await doorbell.start()
            stack.push_async_callback(doorbell.stop)
        if backend == "rabbitmq":
            broker = container.broker()
            stack.push_async_callback(broker.stop)
            await _start_tolerantly("rabbitmq", broker.start)
            relay_task = asyncio.create_task(container.relay().run(), name="outbox-relay")
            stack.push_async_callback(_cancel, relay_task)
            queue = container.queue()
            assert isinstance(queue, RabbitMqQueue)
            sweeper = asyncio.create_task(
                sweep_dead_letters(queue.sweep_dead_letters), name="dead-letters"
            )
            stack.push_async_callback(_cancel, sweeper)
        stack.callback(container.exporter().close)  # after the flusher's last flush
        flusher = container.export_flusher()
        await flusher.try_recover()  # if it cannot yet, its task retries (not ready until then)
        stack.push_async_callback(flusher.close)  # after the task below is cancelled
        flusher_task = asyncio.create_task(flusher.run(), name="export-flusher")
        stack.push_async_callback(_cancel, flusher_task)
        housekeeping = asyncio.create_task(_housekeeping(container), name="housekeeping")
        stack.push_async_callback(_cancel, housekeeping)
        stack.callback(container.doorbell().close)  # long-polling consumers answer now
        yield


async def sweep_dead_letters(
    sweep: Callable[[datetime], Awaitable[object]], interval: float = 5.0
) -> None:
    """Carry the broker's dead letters into the repository (`sweep`, RabbitMqQueue's),
    every `interval` seconds; a sweep skipped for an outage is logged when the outage starts
    and when it is over, not at every attempt."""
    skipped = Outage(log, "dead-letter sweep skipped: %s", "dead-letter sweep runs again")
    while True:
        try:
            await sweep(utc_now())
        except DependencyUnavailable as exc:
            skipped.failed(exc)
        else:
            skipped.passed()
        await asyncio.sleep(interval)


async def _housekeeping(container: Container) -> None:
    """Every HOUSEKEEPING_EVERY seconds, from start-up on: forget expired idempotency keys
    and, with RETAIN_CONSUMED or RETAIN_EXPORTS, delete what is older (`workflows prune`)."""
    settings: Settings = container.settings()
    retaining = settings.retain_consumed is not None or settings.retain_exports is not None
    while True:
        try:
            purged = await container.repository().purge_expired_keys(utc_now())
            if purged:
                log.info("forgot %d expired idempotency keys", purged)
        except DependencyUnavailable as exc:
            log.warning("housekeeping skipped: %s", exc)
        if retaining:
            await _retain(container, settings)
        await asyncio.sleep(HOUSEKEEPING_EVERY)


async def _retain(container: Container, settings: Settings) -> None:
    consumed, exports = settings.retain_consumed, settings.retain_exports
    try:
        pruned = await container.prune_workflows()(
            workflows_older_than=consumed, exports_older_than=exports
        )
    except DependencyUnavailable as exc:
        log.warning("retention skipped: %s", exc)
        return
    if pruned.workflows:
        assert consumed is not None
        log.info(
            "retention: deleted %d workflows consumed more than %s ago, and %d export files "
            "of theirs",
            pruned.workflows,
            age_text(consumed),
            pruned.their_exports,
        )
    if pruned.exports:
        assert exports is not None
        log.info(
            "retention: deleted %d export files written more than %s ago",
            pruned.exports,
            age_text(exports),
        )


async def _start_tolerantly(name: str, start: Callable[[], Awaitable[None]]) -> None:
    try:
        await start()
    except DependencyUnavailable as exc:
        log.warning("%s is unavailable at start-up (%s); retrying on demand", name, exc.detail)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

"""Every implementation of a port, fake and real, behind one fixture per port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest

from workflows.adapters.memory import InMemoryQueue, InMemoryWorkflowRepository
from workflows.application.ports import WorkflowQueue, WorkflowRepository
from workflows.application.relay import OutboxRelay
from workflows.domain.ids import uuid7
from workflows.domain.model import JsonDocument, Workflow


@attrs.define
class QueueSetup:
    repository: WorkflowRepository
    queue: WorkflowQueue

    async def submit(self, data: str = '{"a": 1}') -> Workflow:
        workflow = Workflow.new(uuid7(), JsonDocument(data), ("step",), datetime.now(UTC))
        await self.repository.add(workflow)
        await self.queue.enqueued(workflow)
        return workflow


# Sync fixtures: pytest-asyncio cannot resolve an async fixture (`pg`) through
# request.getfixturevalue() while the event loop is running (pytest-asyncio#976).
@pytest.fixture(params=["memory", "postgres"])
def repository(request: pytest.FixtureRequest) -> WorkflowRepository:
    if request.param == "memory":
        return InMemoryWorkflowRepository()
    from workflows.adapters.postgres import PostgresWorkflowRepository

    database = request.getfixturevalue("pg")
    return PostgresWorkflowRepository(database.pool, outbox=False)


@pytest.fixture(
    params=["memory", "postgres", "rabbitmq", "rabbitmq-confirmed", "rabbitmq-prefetch"]
)
def queue_backend(request: pytest.FixtureRequest) -> tuple[str, Any]:
    """The backend's name, and its started database (None for memory). `rabbitmq` answers
    an enqueue at once, and a consume that gets no message takes a workflow from the
    database's rows (published or not); with `rabbitmq-confirmed` an enqueue waits for the
    broker's confirm, so consumes take their workflows through the broker's messages;
    `rabbitmq-prefetch` is `rabbitmq` with a prefetching consumer (the service's
    default)."""
    if request.param == "memory":
        return request.param, None
    return request.param, request.getfixturevalue("pg")


@pytest.fixture
async def queue_setup(
    request: pytest.FixtureRequest, queue_backend: tuple[str, Any]
) -> AsyncIterator[QueueSetup]:
    backend, database = queue_backend
    if backend == "memory":
        memory = InMemoryWorkflowRepository()
        yield QueueSetup(memory, InMemoryQueue(memory))
        return
    from workflows.adapters.postgres import (
        PostgresOutbox,
        PostgresQueue,
        PostgresWorkflowRepository,
    )

    if backend == "postgres":
        repository = PostgresWorkflowRepository(database.pool, outbox=False)
        yield QueueSetup(repository, PostgresQueue(database.pool))
        return

    from workflows.adapters.rabbitmq import RabbitMqBroker, RabbitMqQueue

    url = request.getfixturevalue("rabbitmq_url")
    prefetch = 32 if backend == "rabbitmq-prefetch" else 0
    # The queue as the service declares it (container.py): a delivery limit of 2 x 5.
    broker = RabbitMqBroker(
        url,
        queue=request.getfixturevalue("queue_name"),
        arguments={"x-delivery-limit": 10},
        prefetch=prefetch,
    )
    await broker.start()
    repository = PostgresWorkflowRepository(database.pool, outbox=True)
    outbox = PostgresOutbox(database.pool)
    relay = OutboxRelay(outbox, broker)
    relay_task = asyncio.create_task(relay.run())
    wait = backend == "rabbitmq-confirmed"
    rows = PostgresQueue(database.pool)
    try:
        yield QueueSetup(
            repository, RabbitMqQueue(repository, broker, relay, rows, wait_for_confirm=wait)
        )
    finally:
        relay_task.cancel()
        await asyncio.gather(relay_task, return_exceptions=True)
        await broker.delete_queue()
        await broker.stop()

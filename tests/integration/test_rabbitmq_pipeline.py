"""The pipelined broker on the real RabbitMQ (and PostgreSQL for the outbox): many
batches confirmed together, each message delivered once; a refused batch, or one cut off
mid-way, loses nothing; a process holds no message that another could take."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest

from tests.integration.test_rabbitmq_broker import left_after_reconnecting, take, uuids_of
from tests.support.tcp_proxy import TcpProxy
from workflows.adapters.postgres import PostgresDatabase, PostgresOutbox, PostgresWorkflowRepository
from workflows.adapters.rabbitmq import Delivery, RabbitMqBroker
from workflows.application.relay import OutboxRelay
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.ids import uuid7
from workflows.domain.model import JsonDocument, Workflow

pytestmark = pytest.mark.rabbitmq


@contextlib.asynccontextmanager
async def started(
    url: str, queue: str, arguments: Mapping[str, object] | None = None
) -> AsyncIterator[RabbitMqBroker]:
    broker = RabbitMqBroker(url, queue=queue, timeout=5.0, arguments=arguments)
    await broker.start()
    try:
        yield broker
    finally:
        with contextlib.suppress(DependencyUnavailable):
            await broker.delete_queue()
        await broker.stop()


async def drain(broker: RabbitMqBroker, takers: int = 16) -> list[Delivery]:
    """Every message in the queue, taken by concurrent gets, each acked."""
    taken: list[Delivery] = []

    async def taker() -> None:
        while (delivery := await broker.get()) is not None:
            taken.append(delivery)
            broker.ack(delivery)

    await asyncio.gather(*(taker() for _ in range(takers)))
    return taken


async def test_concurrent_batches_are_confirmed_and_each_message_arrives_once(
    rabbitmq_url: str, queue_name: str
) -> None:
    async with started(rabbitmq_url, queue_name) as broker:
        batches = [[uuid4() for _ in range(200)] for _ in range(25)]
        await asyncio.gather(*(broker.publish(batch) for batch in batches))
        published = [uuid for batch in batches for uuid in batch]
        assert await broker.depth() == len(published)  # confirmed: every one is queued
        taken = await drain(broker)
        assert sorted(uuids_of(taken)) == sorted(published)  # each exactly once
        assert await left_after_reconnecting(broker) == 0


async def test_messages_of_a_batch_keep_their_order(rabbitmq_url: str, queue_name: str) -> None:
    async with started(rabbitmq_url, queue_name) as broker:
        batch = [uuid4() for _ in range(300)]
        await broker.publish(batch)
        taken = [await broker.get() for _ in batch]
        assert uuids_of([d for d in taken if d is not None]) == batch


def workflow() -> Workflow:
    return Workflow.new(uuid7(), JsonDocument('{"a": 1}'), ("step",), datetime.now(UTC))


@pytest.mark.postgres
async def test_a_batch_the_broker_nacks_raises_and_the_outbox_keeps_its_entries(
    rabbitmq_url: str, queue_name: str, pg: PostgresDatabase
) -> None:
    # A queue that refuses publishes once full: the broker nacks them.
    arguments = {"x-max-length": 2, "x-overflow": "reject-publish"}
    async with started(rabbitmq_url, queue_name, arguments=arguments) as broker:
        refused = await fill_until_refused(broker)
        assert "nacked" in refused.detail

        repository = PostgresWorkflowRepository(pg.pool, outbox=True)
        outbox = PostgresOutbox(pg.pool)
        relay = OutboxRelay(outbox, broker, confirm_timeout=0.5, outage_backoff=0.0)
        workflows = [workflow() for _ in range(2)]
        for w in workflows:
            await repository.add(w)
        assert await relay.flush() == 0  # nothing waits and nothing is stale: nothing taken
        relay.stale_after = 0.0  # every entry is due now
        assert await relay.flush() == 0
        assert await outbox.size() == 2, "a refused batch leaves its entries"

        await drain(broker)  # room again: the next flush delivers them
        assert await relay.flush() == 2
        assert await outbox.size() == 0
        delivered = set(uuids_of(await drain(broker)))
        assert delivered >= {w.uuid for w in workflows}


async def fill_until_refused(broker: RabbitMqBroker) -> DependencyUnavailable:
    for _ in range(10):  # a quorum queue's length limit is approximate
        try:
            await broker.publish([uuid4()])
        except DependencyUnavailable as refused:
            return refused
    raise AssertionError("the broker never refused a message")


async def test_batches_cut_off_mid_way_lose_no_confirmed_message(
    rabbitmq_url: str, queue_name: str
) -> None:
    proxy = TcpProxy.to_amqp(rabbitmq_url)
    await proxy.up()
    confirmed: list[UUID] = []
    try:
        async with started(proxy.url, queue_name) as broker:

            async def publish(batch: list[UUID]) -> None:
                try:
                    await broker.publish(batch)
                except DependencyUnavailable:
                    return  # an outbox would keep these: nothing was promised
                confirmed.extend(batch)

            batches = [[uuid4() for _ in range(500)] for _ in range(20)]
            publishing = [asyncio.create_task(publish(batch)) for batch in batches]
            await asyncio.sleep(0.02)
            await proxy.cut()  # the connection dies with batches on the wire
            await asyncio.gather(*publishing)
            await proxy.cut()
            delivered = set(uuids_of(await drain(broker)))
            assert set(confirmed) <= delivered, "a confirmed message was lost"
    finally:
        await proxy.down()


async def test_a_process_holds_no_message_another_one_could_take(
    rabbitmq_url: str, queue_name: str
) -> None:
    """No prefetching: a message is taken only by a consume call that asks for one, so an
    idle process never keeps one from a busy one."""
    async with started(rabbitmq_url, queue_name) as idle, started(rabbitmq_url, queue_name) as busy:
        assert await idle.get() is None  # it has asked before, and stays connected
        published = [uuid4() for _ in range(5)]
        await busy.publish(published)
        assert sorted(uuids_of(await take(busy, 5, within=2.0))) == sorted(published)

"""RabbitMqQueue on the real RabbitMQ: what the contract suite cannot provoke."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Collection
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pika
import pytest

from tests.integration.test_rabbitmq_broker import left_after_reconnecting
from tests.support.tcp_proxy import TcpProxy
from workflows.adapters.memory import InMemoryWorkflowRepository
from workflows.adapters.rabbitmq import RabbitMqBroker, RabbitMqQueue
from workflows.adapters.rabbitmq.delivery import Delivery
from workflows.adapters.rabbitmq.queue import BROKER_RETRY_AFTER, BROKER_STALLED_AFTER
from workflows.application.ports import (
    ClaimHandler,
    Outbox,
    OutboxEntry,
    WorkflowQueue,
    WorkflowRepository,
)
from workflows.application.relay import OutboxRelay
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.ids import uuid7
from workflows.domain.model import JsonDocument, Workflow, WorkflowStatus

pytestmark = pytest.mark.rabbitmq


def now() -> datetime:
    return datetime.now(UTC)


class MemoryOutbox(Outbox):
    """Every entry is due at once; enough to drive the relay in these tests. `repository`
    says which workflows are queued."""

    def __init__(self, repository: WorkflowRepository) -> None:
        self.entries: list[OutboxEntry] = []
        self.repository = repository

    def add(self, uuid: UUID) -> None:
        self.entries.append(OutboxEntry(len(self.entries) + 1, uuid))

    @contextlib.asynccontextmanager
    async def claim(
        self, uuids: Collection[UUID], *, stale_after: float, limit: int
    ) -> AsyncIterator[list[OutboxEntry]]:
        taken = self.entries[:limit]
        yield list(taken)
        self.entries = [e for e in self.entries if e not in taken]

    async def delete(self, uuids: Collection[UUID]) -> None:
        gone = set(uuids)
        self.entries = [e for e in self.entries if e.workflow_uuid not in gone]

    async def size(self) -> int:
        return len(self.entries)

    async def discard_unqueued(self, uuids: Collection[UUID]) -> set[UUID]:
        named = set(uuids)
        unqueued = set()
        for entry in self.entries:
            workflow = await self.repository.get(entry.workflow_uuid)
            if entry.workflow_uuid in named and (workflow is None or not workflow.queued):
                unqueued.add(entry.workflow_uuid)
        await self.delete(unqueued)
        return unqueued


class QueuedRows(WorkflowQueue):
    """The in-memory repository's queued workflows as a queue, oldest first: what
    PostgresQueue is to the database's rows."""

    def __init__(self, repository: InMemoryWorkflowRepository) -> None:
        self._repository = repository

    async def enqueued(self, workflow: Workflow) -> None:
        return None

    async def consume(self, handle: ClaimHandler, now: datetime) -> Workflow | None:
        queued = await self._repository.list(
            status=WorkflowStatus.INSERTED, after=None, limit=1000, dead_lettered=False
        )
        for workflow in queued:
            claimed = await self._repository.claim(workflow.uuid, handle, now)
            if claimed is not None:
                return claimed
        return None

    async def ping(self) -> None:
        return None


class Setup:
    def __init__(
        self,
        broker: RabbitMqBroker,
        *,
        wait_for_confirm: bool = True,
        outbox: MemoryOutbox | None = None,
    ) -> None:
        self.broker = broker
        self.repository = InMemoryWorkflowRepository()
        self.outbox = MemoryOutbox(self.repository) if outbox is None else outbox
        self.outbox.repository = self.repository
        self.relay = OutboxRelay(
            self.outbox,
            broker,
            confirm_timeout=0.5,
            sweep_interval=0.1,
            outage_backoff=0.1,
            hand_over_delay=0.0,  # a test that flushes by hand publishes what it handed over
        )
        self.rows = QueuedRows(self.repository)
        self.queue = RabbitMqQueue(
            self.repository, broker, self.relay, self.rows, wait_for_confirm=wait_for_confirm
        )

    async def stored(self) -> Workflow:
        workflow = Workflow.new(uuid7(), JsonDocument('{"a": 1}'), ("step",), now())
        await self.repository.add(workflow)
        return workflow

    async def submit(self) -> Workflow:
        workflow = await self.stored()
        self.outbox.add(workflow.uuid)
        await self.queue.enqueued(workflow)
        return workflow


@contextlib.asynccontextmanager
async def running(
    url: str,
    queue_name: str,
    *,
    relay: bool = True,
    wait_for_confirm: bool = True,
    outbox: MemoryOutbox | None = None,
) -> AsyncIterator[Setup]:
    """A started queue; without `relay`, a test flushes the relay when it wants the messages
    published."""
    broker = RabbitMqBroker(url, queue=queue_name, timeout=2.0)
    await broker.start()
    setup = Setup(broker, wait_for_confirm=wait_for_confirm, outbox=outbox)
    relay_task = asyncio.create_task(setup.relay.run()) if relay else None
    try:
        yield setup
    finally:
        if relay_task is not None:
            relay_task.cancel()
            await asyncio.gather(relay_task, return_exceptions=True)
        with contextlib.suppress(DependencyUnavailable):
            await broker.delete_queue()
        await broker.stop()


@pytest.fixture
async def setup(rabbitmq_url: str, queue_name: str) -> AsyncIterator[Setup]:
    async with running(rabbitmq_url, queue_name) as setup:
        yield setup


async def consumed(setup: Setup) -> list[UUID]:
    taken = []
    while (workflow := await setup.queue.consume(record_nothing, now())) is not None:
        taken.append(workflow.uuid)
    return taken


async def record_nothing(workflow: Workflow) -> None:
    return None


async def test_duplicate_and_unknown_messages_are_acked_and_skipped(setup: Setup) -> None:
    first, second = await setup.stored(), await setup.stored()
    await setup.broker.publish([first.uuid, uuid4(), first.uuid, second.uuid])
    assert await consumed(setup) == [first.uuid, second.uuid]
    assert await left_after_reconnecting(setup.broker) == 0


async def test_malformed_message_is_dropped_and_the_next_workflow_consumed(
    setup: Setup, rabbitmq_url: str
) -> None:
    def publish_garbage() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
        try:
            connection.channel().basic_publish("", setup.broker.queue, b"\xffnot a uuid")
        finally:
            connection.close()

    await asyncio.to_thread(publish_garbage)
    workflow = await setup.submit()
    assert await consumed(setup) == [workflow.uuid]
    assert await left_after_reconnecting(setup.broker) == 0


async def test_cancelled_consume_leaves_the_workflow_queued(setup: Setup) -> None:
    workflow = await setup.submit()
    exporting = asyncio.Event()

    async def stuck(w: Workflow) -> None:
        exporting.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(setup.queue.consume(stuck, now()))
    await exporting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stored = await setup.repository.get(workflow.uuid)
    assert stored is not None
    assert stored.status is WorkflowStatus.INSERTED
    assert await consumed(setup) == [workflow.uuid]


async def test_workflow_enqueued_while_broker_is_down_is_consumable_once_it_is_back(
    queue_name: str, rabbitmq_url: str
) -> None:
    proxy = TcpProxy.to_amqp(rabbitmq_url)
    await proxy.up()
    async with running(proxy.url, queue_name) as setup:
        await proxy.down()
        workflow = await setup.submit()  # returns: the outbox keeps the message
        assert await setup.outbox.size() == 1
        with pytest.raises(DependencyUnavailable):
            await setup.queue.ping()
        await proxy.up()
        for _ in range(100):  # the relay's next sweep delivers it
            if not await setup.outbox.size():
                break
            await asyncio.sleep(0.05)
        assert await consumed(setup) == [workflow.uuid]
        await setup.queue.ping()
    await proxy.down()


async def test_broker_dead_letters_a_crash_looping_message_and_the_sweep_records_it(
    rabbitmq_url: str, queue_name: str
) -> None:
    broker = RabbitMqBroker(
        rabbitmq_url, queue=queue_name, timeout=2.0, arguments={"x-delivery-limit": 1}
    )
    await broker.start()
    setup = Setup(broker)
    try:
        workflow = await setup.stored()
        await broker.publish([workflow.uuid])
        returns = 0
        while (delivery := await broker.get()) is not None and returns < 10:
            broker.requeue(delivery)  # as a consumer that crashes before counting would
            returns += 1
        assert delivery is None, "the broker should have dead-lettered the message"
        assert await setup.queue.sweep_dead_letters(now()) == 1
        stored = await setup.repository.get(workflow.uuid)
        assert stored is not None
        assert stored.dead_lettered_at is not None
        assert await setup.queue.consume(record_nothing, now()) is None
    finally:
        await broker.delete_queue()
        await broker.stop()


def answering_on_commit(
    url: str, queue_name: str, outbox: MemoryOutbox | None = None
) -> contextlib.AbstractAsyncContextManager[Setup]:
    """`enqueued` hands the entry to the relay and returns at once; the relay is not running."""
    return running(url, queue_name, relay=False, wait_for_confirm=False, outbox=outbox)


async def test_enqueued_answers_without_waiting_for_the_broker(
    rabbitmq_url: str, queue_name: str
) -> None:
    async with answering_on_commit(rabbitmq_url, queue_name) as setup:
        workflow = await setup.stored()
        setup.outbox.add(workflow.uuid)
        # No relay runs: waiting for the confirm would take confirm_timeout (0.5 s).
        await asyncio.wait_for(setup.queue.enqueued(workflow), timeout=0.1)
        assert await setup.outbox.size() == 1
        assert await setup.relay.flush(sweep=False) == 1  # the entry was handed over
        assert await setup.outbox.size() == 0


async def test_an_unpublished_workflow_is_consumed_from_the_rows_and_never_published(
    rabbitmq_url: str, queue_name: str
) -> None:
    async with answering_on_commit(rabbitmq_url, queue_name) as setup:
        first, second = await setup.submit(), await setup.submit()
        taken = await setup.queue.consume(record_nothing, now())  # nothing published yet
        assert taken is not None
        assert taken.uuid == first.uuid
        # The relay finds first consumed: its entry goes, its message is never published.
        assert await setup.relay.flush(sweep=False) == 1
        assert await setup.outbox.size() == 0
        assert await left_after_reconnecting(setup.broker) == 1  # second's message only
        assert await consumed(setup) == [second.uuid]
        assert await left_after_reconnecting(setup.broker) == 0


async def test_a_message_published_before_its_workflow_was_taken_from_the_rows_is_skipped(
    rabbitmq_url: str, queue_name: str
) -> None:
    async with answering_on_commit(rabbitmq_url, queue_name) as setup:
        first = await setup.submit()
        second = await setup.stored()
        # first is consumed from the rows while its message is on its way to the broker.
        taken = await setup.queue.consume(record_nothing, now())
        assert taken is not None
        assert taken.uuid == first.uuid
        await setup.broker.publish([first.uuid, second.uuid])
        assert await consumed(setup) == [second.uuid]  # first's message acked and skipped
        assert await left_after_reconnecting(setup.broker) == 0


async def test_a_consume_takes_the_broker_s_message_before_the_rows(
    rabbitmq_url: str, queue_name: str
) -> None:
    async with answering_on_commit(rabbitmq_url, queue_name) as setup:
        first, second = await setup.stored(), await setup.stored()
        await setup.broker.publish([second.uuid])  # first's message is not there yet
        taken = await setup.queue.consume(record_nothing, now())
        assert taken is not None
        assert taken.uuid == second.uuid
        stored = await setup.repository.get(first.uuid)
        assert stored is not None
        assert stored.status is WorkflowStatus.INSERTED
        assert await consumed(setup) == [first.uuid]  # from the rows: the broker is empty
        assert await left_after_reconnecting(setup.broker) == 0


class CountingBroker(RabbitMqBroker):
    """Counts the gets that reach the broker (held messages included)."""

    gets = 0

    async def get(self, *, dead: bool = False) -> Delivery | None:
        self.gets += 1
        return await super().get(dead=dead)


async def test_consumes_that_ask_together_share_an_empty_answer(
    rabbitmq_url: str, queue_name: str
) -> None:
    broker = CountingBroker(rabbitmq_url, queue=queue_name, timeout=2.0)
    await broker.start()
    setup = Setup(broker, wait_for_confirm=False)
    try:
        assert await setup.queue.consume(record_nothing, now()) is None  # found empty
        broker.gets = 0
        workflows = [await setup.stored() for _ in range(3)]  # not published: in the rows
        taken = await asyncio.gather(
            *(setup.queue.consume(record_nothing, now()) for _ in range(8))
        )
        assert sorted(w.uuid for w in taken if w is not None) == [w.uuid for w in workflows]
        assert broker.gets == 1  # one get on its way, its empty answer shared by all eight
        await broker.publish([uuid4()])  # an unknown workflow's message: skipped
        assert await setup.queue.consume(record_nothing, now()) is None
        assert broker.gets == 3  # after a message, each consume asks again
    finally:
        await broker.delete_queue()
        await broker.stop()


@contextlib.asynccontextmanager
async def behind_a_relay(
    rabbitmq_url: str, queue_name: str
) -> AsyncIterator[tuple[TcpProxy, CountingBroker, Setup, list[Workflow]]]:
    """A queue whose broker is reached through a TCP relay, two workflows published on it
    (confirmed); the relay is up again, and the queue deleted, at the end."""
    proxy = TcpProxy.to_amqp(rabbitmq_url)
    await proxy.up()
    broker = CountingBroker(proxy.url, queue=queue_name, timeout=2.0)
    await broker.start()
    setup = Setup(broker, wait_for_confirm=True)
    try:
        yield proxy, broker, setup, [await setup.submit() for _ in range(2)]
    finally:
        proxy.flow()
        await proxy.up()
        with contextlib.suppress(DependencyUnavailable):
            await broker.delete_queue()
        await broker.stop()
        await proxy.down()


async def test_while_the_broker_is_away_consumes_take_from_the_rows_and_ask_it_once_a_second(
    rabbitmq_url: str, queue_name: str
) -> None:
    async with behind_a_relay(rabbitmq_url, queue_name) as (proxy, broker, setup, published):
        await proxy.down()
        broker.gets = 0
        started = time.monotonic()
        taken = [await setup.queue.consume(record_nothing, now()) for _ in range(3)]
        assert [w.uuid if w else None for w in taken] == [
            published[0].uuid,
            published[1].uuid,
            None,
        ]
        assert time.monotonic() - started < BROKER_RETRY_AFTER  # no call timeout waited
        assert broker.gets == 1  # the first failed: the next ones left the broker alone
        stored = await setup.repository.get(published[0].uuid)
        assert stored is not None
        assert stored.status is WorkflowStatus.CONSUMED

        await asyncio.sleep(BROKER_RETRY_AFTER)
        assert await setup.queue.consume(record_nothing, now()) is None
        assert broker.gets == 2  # a second later, the broker is asked again
        await proxy.up()
        await asyncio.sleep(BROKER_RETRY_AFTER)
        # Back: the messages of the workflows taken from the rows are acked and skipped.
        assert await setup.queue.consume(record_nothing, now()) is None
        assert broker.gets > 2
        assert await left_after_reconnecting(broker) == 0


async def test_a_database_away_still_fails_the_consume(rabbitmq_url: str, queue_name: str) -> None:
    """Only the broker's failure is taken for "no message": the rows' failing is not."""

    class AwayRows(QueuedRows):
        async def consume(self, handle: ClaimHandler, now: datetime) -> Workflow | None:
            raise DependencyUnavailable("postgresql", "connection refused")

    proxy = TcpProxy.to_amqp(rabbitmq_url)
    await proxy.up()
    async with running(proxy.url, queue_name) as setup:
        setup.queue = RabbitMqQueue(
            setup.repository, setup.broker, setup.relay, AwayRows(setup.repository)
        )
        await proxy.down()
        with pytest.raises(DependencyUnavailable, match="postgresql"):
            await setup.queue.consume(record_nothing, now())
        await proxy.up()
    await proxy.down()


async def test_a_hung_broker_holds_one_consume_not_each(rabbitmq_url: str, queue_name: str) -> None:
    """A broker that neither answers nor refuses (packets dropped): the consume whose get
    is on its way waits for the call timeout; those after it take from the rows at once."""
    async with behind_a_relay(rabbitmq_url, queue_name) as (proxy, broker, setup, published):
        proxy.stall()
        first = asyncio.create_task(setup.queue.consume(record_nothing, now()))
        await asyncio.sleep(BROKER_STALLED_AFTER + 0.2)
        assert not first.done()
        started = time.monotonic()
        second = await setup.queue.consume(record_nothing, now())
        assert time.monotonic() - started < 0.5  # not behind the get on its way
        assert second is not None
        assert second.uuid == published[0].uuid  # the oldest, from the rows
        taken = await asyncio.wait_for(first, 5)  # after the 2 s call timeout, from the rows
        assert taken is not None
        assert taken.uuid == published[1].uuid
        proxy.flow()
        await asyncio.sleep(BROKER_RETRY_AFTER)
        # Back: both messages are still on the broker, and skipped.
        assert await setup.queue.consume(record_nothing, now()) is None
        assert await left_after_reconnecting(broker) == 0


async def test_consumes_failing_for_the_export_directory_dead_letter_nothing(
    rabbitmq_url: str, queue_name: str
) -> None:
    """A 503 (the export directory full, say) is not the workflow's fault: its message is
    not handed back, which the quorum queue would count towards its delivery limit, and the
    workflow, still queued in the rows, is consumed once the directory is back."""
    broker = RabbitMqBroker(
        rabbitmq_url, queue=queue_name, timeout=2.0, arguments={"x-delivery-limit": 1}
    )
    await broker.start()
    setup = Setup(broker)
    try:
        workflows = [await setup.stored() for _ in range(2)]
        await broker.publish([w.uuid for w in workflows])

        async def directory_full(workflow: Workflow) -> None:
            raise DependencyUnavailable("export directory", "No space left on device")

        for _ in range(6):  # three times the limit for each message
            with pytest.raises(DependencyUnavailable):
                await setup.queue.consume(directory_full, now())
        assert await setup.queue.sweep_dead_letters(now()) == 0
        assert await consumed(setup) == [w.uuid for w in workflows]  # from the rows
        for workflow in workflows:
            stored = await setup.repository.get(workflow.uuid)
            assert stored is not None
            assert (stored.dead_lettered_at, stored.delivery_attempts) == (None, 0)
        assert await left_after_reconnecting(broker) == 0
    finally:
        await broker.delete_queue()
        await broker.stop()

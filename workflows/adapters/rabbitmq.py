"""RabbitMQ adapters: workflow uuids on a durable quorum queue, fed by the outbox relay.

pika is blocking and not thread-safe, so each connection lives on a thread of its own that
runs jobs one at a time and services the connection (heartbeats) while idle; the event
loop only awaits futures. Publishing and consuming use separate connections: under a
memory or disk alarm RabbitMQ blocks connections that publish, and a consumer sharing one
could then no longer ack; a batch being confirmed never delays a consume either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Generic, TypeVar
from uuid import UUID

import attrs
import pika
from pika.exceptions import AMQPError

from workflows.application.ports import (
    ClaimHandler,
    MessagePublisher,
    WorkflowQueue,
    WorkflowRepository,
)
from workflows.application.relay import OutboxRelay
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.model import Workflow

log = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[Any], T]  # runs on the connection's thread, given its open BlockingChannel
PERSISTENT = pika.BasicProperties(delivery_mode=2, content_type="text/plain")
IDLE_TICK = 1.0  # seconds between services of an idle connection (heartbeats); jobs wake it


@attrs.frozen
class Delivery:
    """A message taken with basic.get, unacked. Its tag is only valid on the channel that
    delivered it (`generation`); once that channel is gone the broker requeues it."""

    body: bytes
    tag: int
    generation: int


@attrs.define(eq=False)
class _Call(Generic[T]):
    job: Job[T]
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[T] | None = None
    on_orphan: Callable[[T], None] | None = None
    generation: int | None = None  # run only on this channel, never reconnect for it
    abandoned: bool = False  # the caller gave up before the job started: skip it


class _ConnectionThread:
    """One BlockingConnection and one channel, confined to one thread. Jobs run in order;
    a failed job drops the connection and the next job opens a new one."""

    def __init__(
        self, name: str, parameters: pika.ConnectionParameters, setup: Job[None], timeout: float
    ) -> None:
        self._parameters = parameters
        self._setup = setup
        self._timeout = timeout
        self._name = name
        self._calls: queue.SimpleQueue[_Call[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._connection: Any = None
        self._channel: Any = None
        self._idle = False
        self.generation = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Run the jobs already queued, close the connection, join the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._calls.put(None)
        self._wake()
        await asyncio.to_thread(thread.join)

    async def call(self, job: Job[T], *, on_orphan: Callable[[T], None] | None = None) -> T:
        """Run `job` on the thread. If the caller is cancelled or times out after the job
        produced a result, `on_orphan(result)` gets it, so that nothing is stranded."""
        if self._thread is None:
            raise DependencyUnavailable("rabbitmq", "the broker adapter is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        call = _Call(job, loop, future, on_orphan)
        future.add_done_callback(lambda f: setattr(call, "abandoned", f.cancelled()))
        self._put(call)
        try:
            async with asyncio.timeout(self._timeout):
                return await future
        except BaseException as error:
            if on_orphan and future.done() and not future.cancelled() and not future.exception():
                on_orphan(future.result())
            if isinstance(error, TimeoutError):
                raise DependencyUnavailable("rabbitmq", f"no answer in {self._timeout}s") from None
            raise

    def post(self, job: Job[object], *, generation: int) -> None:
        """Run `job` later, only if the channel of `generation` is still open; no result.
        Once stopped, the connection is closed and the broker has requeued every delivery."""
        if self._thread is not None:
            self._put(_Call(job, generation=generation))

    def _put(self, call: _Call[Any]) -> None:
        self._calls.put(call)
        self._wake()

    def _wake(self) -> None:
        connection = self._connection
        if self._idle and connection is not None:
            # ends process_data_events; fails only when closing, and then no one waits on it
            with contextlib.suppress(Exception):
                connection.add_callback_threadsafe(lambda: None)

    def _run(self) -> None:
        while (call := self._next_call()) is not None:
            if not call.abandoned:
                self._execute(call)
        self._disconnect()

    def _next_call(self) -> _Call[Any] | None:
        """The next job; while there is none, keep the connection serviced."""
        while True:
            self._idle = True  # before looking, so that `_put` wakes us if it sees an empty queue
            try:
                return self._calls.get(block=self._connection is None)
            except queue.Empty:
                try:
                    self._connection.process_data_events(time_limit=IDLE_TICK)
                except Exception as error:
                    log.warning("rabbitmq connection lost while idle: %r", error)
                    self._disconnect()
            finally:
                self._idle = False

    def _execute(self, call: _Call[Any]) -> None:
        try:
            result = self._attempt(call)
        except Exception as error:
            self._disconnect()
            if isinstance(error, AMQPError | OSError):
                error = DependencyUnavailable("rabbitmq", repr(error))
            if call.future is None:
                log.warning("rabbitmq job failed: %s", error)
            self._settle(call, None, error)
        else:
            self._settle(call, result, None)

    def _attempt(self, call: _Call[Any]) -> Any:
        if call.generation is not None:
            if call.generation != self.generation or self._channel is None:
                return None  # that channel is gone and the broker requeued its deliveries
            return call.job(self._channel)
        reused = self._channel is not None and self._channel.is_open
        try:
            return call.job(self._open_channel())
        except (AMQPError, OSError) as error:
            if not reused:
                raise
            # The connection may have died unnoticed (broker restart, network cut), or the
            # queue may be gone: retry once on a new connection, which declares it again.
            # Safe: the broker requeues whatever the dead channel took, and a publish
            # repeated in part only makes duplicates, which consumers skip.
            log.info("rabbitmq call failed on a reused connection, retrying: %r", error)
            self._disconnect()
            return call.job(self._open_channel())

    def _settle(self, call: _Call[Any], result: Any, error: Exception | None) -> None:
        def settle() -> None:
            assert call.future is not None
            if call.future.cancelled():
                if error is None and call.on_orphan is not None:
                    call.on_orphan(result)
            elif error is not None:
                call.future.set_exception(error)
            else:
                call.future.set_result(result)

        if call.loop is not None:
            try:
                call.loop.call_soon_threadsafe(settle)
            except RuntimeError:
                log.warning("event loop closed before a rabbitmq job finished")

    def _open_channel(self) -> Any:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self._disconnect()
        self._connection = pika.BlockingConnection(self._parameters)
        channel = self._connection.channel()
        self._setup(channel)
        self._channel = channel
        self.generation += 1
        return channel

    def _disconnect(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception as error:
                log.debug("closing a broken rabbitmq connection: %r", error)


class RabbitMqBroker(MessagePublisher):
    """One durable quorum queue: publish with confirms, take one message at a time.

    `timeout` bounds connecting (one attempt), a blocked connection and every call, so a
    broker that is down or hung fails the call with DependencyUnavailable instead of
    hanging it. `arguments` are extra queue arguments (`x-delivery-limit`, dead-lettering).
    """

    def __init__(
        self,
        url: str,
        *,
        queue: str = "workflows",
        timeout: float = 5.0,
        arguments: Mapping[str, object] | None = None,
    ) -> None:
        parameters = pika.URLParameters(url)
        parameters.connection_attempts = 1
        parameters.socket_timeout = timeout
        parameters.stack_timeout = timeout
        parameters.blocked_connection_timeout = timeout
        self.queue = queue
        self.dead_letter_queue = f"{queue}.dead"
        self._arguments = {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.dead_letter_queue,
            **(arguments or {}),
            "x-queue-type": "quorum",
        }
        self._publisher = _ConnectionThread(
            "rabbitmq-publisher", parameters, self._setup_publisher, timeout
        )
        self._consumer = _ConnectionThread("rabbitmq-consumer", parameters, self._declare, timeout)

    async def start(self) -> None:
        """Connect both threads and declare the queue. When the broker is unreachable,
        raise DependencyUnavailable but keep the threads: the next call reconnects."""
        self._publisher.start()
        self._consumer.start()
        try:
            await self._publisher.call(lambda channel: None)
            await self._consumer.call(lambda channel: None)
        except DependencyUnavailable:
            raise
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await self._publisher.stop()
        await self._consumer.stop()

    async def publish(self, uuids: Sequence[UUID]) -> None:
        bodies = [str(uuid).encode() for uuid in uuids]

        def publish_all(channel: Any) -> None:
            for body in bodies:  # each basic_publish returns once confirmed, or raises
                channel.basic_publish("", self.queue, body, PERSISTENT, mandatory=True)

        if bodies:
            await self._publisher.call(publish_all)

    async def get(self, *, dead: bool = False) -> Delivery | None:
        """Take the next message (of the dead-letter queue, with `dead`), unacked; None
        when the queue is empty."""
        name = self.dead_letter_queue if dead else self.queue

        def get(channel: Any) -> Delivery | None:
            method, _properties, body = channel.basic_get(name, auto_ack=False)
            if method is None:
                return None
            return Delivery(body or b"", method.delivery_tag, self._consumer.generation)

        return await self._consumer.call(get, on_orphan=self._requeue_orphan)

    def ack(self, delivery: Delivery) -> None:
        """Remove the message, before any later call on this broker; never raises."""
        self._consumer.post(
            lambda channel: channel.basic_ack(delivery.tag), generation=delivery.generation
        )

    def requeue(self, delivery: Delivery) -> None:
        """Hand the message back to the queue, before any later call; never raises."""
        self._consumer.post(
            lambda channel: channel.basic_nack(delivery.tag, requeue=True),
            generation=delivery.generation,
        )

    async def depth(self) -> int:
        """Messages ready in the queue (not counting those taken and not yet acked)."""
        declared = await self._consumer.call(
            lambda channel: channel.queue_declare(self.queue, passive=True)
        )
        return int(declared.method.message_count)

    async def ping(self) -> None:
        await self.depth()

    async def delete_queue(self) -> None:
        def delete(channel: Any) -> None:
            channel.queue_delete(self.queue)
            channel.queue_delete(self.dead_letter_queue)

        await self._consumer.call(delete)

    def _declare(self, channel: Any) -> None:
        channel.queue_declare(
            self.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        channel.queue_declare(self.queue, durable=True, arguments=self._arguments)

    def _setup_publisher(self, channel: Any) -> None:
        self._declare(channel)
        channel.confirm_delivery()

    def _requeue_orphan(self, delivery: Delivery | None) -> None:
        if delivery is not None:
            self.requeue(delivery)


class RabbitMqQueue(WorkflowQueue):
    """A RabbitMQ queue of uuids in front of the repository, which stays the truth: a
    message whose workflow is unknown or no longer INSERTED (a duplicate from a retried
    publish, or a workflow PATCHed to consumed) is acked and skipped."""

    def __init__(
        self, repository: WorkflowRepository, broker: RabbitMqBroker, relay: OutboxRelay
    ) -> None:
        self._repository = repository
        self._broker = broker
        self._relay = relay

    async def enqueued(self, workflow: Workflow) -> None:
        if not await self._relay.publish(workflow.uuid):
            log.info("workflow %s not confirmed yet: the outbox keeps it", workflow.uuid)

    async def consume(self, handle: ClaimHandler, now: datetime) -> Workflow | None:
        while (delivery := await self._broker.get()) is not None:
            uuid = _parse_uuid(delivery.body)
            if uuid is None:
                log.error("dropping a malformed message from the queue: %r", delivery.body)
                self._broker.ack(delivery)
                continue
            try:
                claimed = await self._repository.claim(uuid, handle, now)
            except BaseException:
                self._broker.requeue(delivery)
                raise
            self._broker.ack(delivery)  # after the commit: a lost ack only redelivers a skip
            if claimed is not None:
                return claimed
        return None

    async def ping(self) -> None:
        await self._broker.ping()

    async def sweep_dead_letters(self, now: datetime) -> int:
        """Record, in the repository, the workflows whose messages the broker dead-lettered
        (its delivery limit caught a crash loop that never reached a failure count); how
        many messages were swept."""
        swept = 0
        while (delivery := await self._broker.get(dead=True)) is not None:
            uuid = _parse_uuid(delivery.body)
            if uuid is not None:
                try:
                    await self._repository.record_failure(uuid, now, max_attempts=1)
                except BaseException:
                    self._broker.requeue(delivery)
                    raise
                log.error("the broker dead-lettered workflow %s", uuid)
            self._broker.ack(delivery)
            swept += 1
        return swept


def _parse_uuid(body: bytes) -> UUID | None:
    try:
        return UUID(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None

"""The broker: one durable quorum queue (and its dead-letter queue) on RabbitMQ."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

import pika

from workflows.adapters.rabbitmq.confirms import Confirms
from workflows.adapters.rabbitmq.connection import AmqpConnection
from workflows.adapters.rabbitmq.declaration import declare_queues, queue_arguments
from workflows.adapters.rabbitmq.delivery import Delivery
from workflows.adapters.rabbitmq.lanes import Lane, Ready, Request
from workflows.adapters.rabbitmq.prefetch import Prefetcher
from workflows.application.ports import MessagePublisher
from workflows.domain.errors import DependencyUnavailable

log = logging.getLogger(__name__)

CONSUMER_LANES = 8
"""Channels of a process's consumer connection: how many basic.get it can have on the
wire at once, for the consume calls that find no prefetched message."""


BROKER_TIMEOUT = 5.0
"""Seconds a call to the broker (a publish's confirm, a basic.get, a declaration) waits for
its answer before the broker counts as unavailable."""


class RabbitMqBroker(MessagePublisher):
    """One durable quorum queue: publish with confirms, take one message at a time.

    Publishing and consuming use separate connections: under a memory or disk alarm
    RabbitMQ blocks connections that publish, and a consumer sharing one could then no
    longer ack; a batch being confirmed never delays a consume either.

    `timeout` bounds connecting (one attempt), a blocked connection and every call, so a
    broker that is down or hung fails the call with DependencyUnavailable instead of
    hanging it. `arguments` are extra queue arguments (`x-delivery-limit`, dead-lettering).
    Both connections run on the event loop that calls `start()`; every call must come
    from that loop.

    With `prefetch` > 0 a third connection consumes the queue (basic.consume) with up to
    `prefetch` messages unacked, held in this process until a consume call takes one
    (`get` hands those out first, then asks with basic.get). The broker pushes a message
    for every ack instead of answering a basic.get per message, which on a quorum queue
    costs it a Raft command each (docs/benchmarks.md). What a process holds, no other sees:
    the queue adapter therefore looks in the database when the broker has nothing. `stop()`
    publishes what is still held anew and acks it, so a restart does not count towards
    the messages' delivery limit; a process that dies gives its held messages back, each
    counted as a delivery. A process asked for no message for `prefetch_idle` seconds
    gives back what it holds in the same way and stops consuming until it is asked again,
    so that messages do not wait in a process that is not consuming.
    """

    def __init__(
        self,
        url: str,
        *,
        queue: str = "workflows",
        timeout: float = BROKER_TIMEOUT,
        arguments: Mapping[str, object] | None = None,
        consumer_lanes: int = CONSUMER_LANES,
        prefetch: int = 0,
        prefetch_idle: float = 1.0,
    ) -> None:
        parameters = pika.URLParameters(url)
        parameters.connection_attempts = 1
        parameters.socket_timeout = timeout
        parameters.stack_timeout = timeout
        parameters.blocked_connection_timeout = timeout
        self.queue = queue
        self.dead_letter_queue = f"{queue}.dead"
        self._arguments = queue_arguments(self.dead_letter_queue, arguments)
        self._publisher = AmqpConnection(
            parameters,
            lanes=1,
            setup=self._declare,
            lane_setup=self._confirm_mode,
            timeout=timeout,
        )
        self._consumer = AmqpConnection(
            parameters,
            lanes=consumer_lanes,
            setup=self._declare,
            timeout=timeout,
        )
        self._prefetcher = (
            Prefetcher(
                parameters,
                queue=queue,
                prefetch=prefetch,
                prefetch_idle=prefetch_idle,
                timeout=timeout,
                declare=self._declare,
                publish=self._publish,
            )
            if prefetch > 0
            else None
        )

    @property
    def held(self) -> int:
        """Prefetched messages this process holds for its next consume calls."""
        return 0 if self._prefetcher is None else self._prefetcher.held

    async def start(self) -> None:
        """Connect and declare the queues. When the broker is unreachable, raise
        DependencyUnavailable but keep running: the next call connects again."""
        self._publisher.start()
        self._consumer.start()
        if self._prefetcher is not None:
            self._prefetcher.start()
        try:
            await self._publisher.call(_nothing)
            await self._consumer.call(_nothing)
            if self._prefetcher is not None:
                await self._prefetcher.connection.call(_nothing)
        except DependencyUnavailable:
            raise
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self._prefetcher is not None:
            await self._prefetcher.stop()
        await self._publisher.stop()
        await self._consumer.stop()

    async def publish(self, uuids: Sequence[UUID]) -> None:
        """Publish the whole batch at once, then wait for the broker's confirms of all of
        it (it confirms many with one `multiple` ack): one wait per batch, not a round trip
        per message, and batches of concurrent callers are on the wire together."""
        await self._publish([str(uuid).encode() for uuid in uuids])

    async def _publish(self, bodies: Sequence[bytes]) -> None:
        if not bodies:
            return

        def publish(lane: Lane, request: Request[None]) -> None:
            confirms: Confirms = lane.state
            confirms.publish(self.queue, bodies, request)

        await self._publisher.call(publish, exclusive=False)
        self._publisher.unblocked()  # confirmed: no alarm holds publishes now

    async def get(self, *, dead: bool = False) -> Delivery | None:
        """Take the next message (of the dead-letter queue, with `dead`), unacked; None
        when the queue is empty."""
        name = self.dead_letter_queue if dead else self.queue
        if not dead and self._prefetcher is not None:
            held = self._prefetcher.take()
            if held is not None:
                return held

        def get(lane: Lane, request: Request[Delivery | None]) -> None:
            generation = self._consumer.generation

            def got(_channel: Any, method: Any, _properties: Any, body: bytes | None) -> None:
                tag = method.delivery_tag
                request.succeed(Delivery(body or b"", tag, generation, lane.number))

            lane.on_get_empty = lambda: request.succeed(None)
            lane.channel.basic_get(name, lane.guard(got), auto_ack=False)

        return await self._consumer.call(get, on_orphan=self._requeue_orphan)

    def stalled(self, after: float) -> bool:
        """The consumer connection's opening, or a get, has waited `after` seconds."""
        return self._consumer.stalled(after)

    def ack(self, delivery: Delivery) -> None:
        """Remove the message, before any later call on this broker; never raises."""
        self._delivered_by(delivery).post(
            lambda lane: lane.channel.basic_ack(delivery.tag),
            generation=delivery.generation,
            lane=delivery.lane,
        )

    def requeue(self, delivery: Delivery) -> None:
        """Hand the message back to the queue, before any later call; never raises."""
        self._delivered_by(delivery).post(
            lambda lane: lane.channel.basic_nack(delivery.tag, requeue=True),
            generation=delivery.generation,
            lane=delivery.lane,
        )

    def _delivered_by(self, delivery: Delivery) -> AmqpConnection:
        """The connection of `delivery`, which is being acked or requeued."""
        if delivery.prefetched and self._prefetcher is not None:
            return self._prefetcher.settled()
        return self._consumer

    async def depth(self) -> int:
        """Messages ready in the queue (not counting those taken and not yet acked)."""

        def declare(lane: Lane, request: Request[int]) -> None:
            def declared(frame: Any) -> None:
                request.succeed(int(frame.method.message_count))

            lane.channel.queue_declare(self.queue, passive=True, callback=lane.guard(declared))

        return await self._consumer.call(declare)

    async def ping(self) -> None:
        """Raise DependencyUnavailable when the broker does not answer, or blocks this
        process's publishes (a memory or disk alarm: POSTs then wait in the outbox)."""
        if self._publisher.blocked is not None:
            raise DependencyUnavailable(
                "rabbitmq", f"it blocks publishing: {self._publisher.blocked}"
            )
        await self.depth()

    async def delete_queue(self) -> None:
        def delete(lane: Lane, request: Request[None]) -> None:
            def then_dead_letters(_frame: Any) -> None:
                lane.channel.queue_delete(
                    self.dead_letter_queue, callback=lane.guard(lambda _: request.succeed(None))
                )

            lane.channel.queue_delete(self.queue, callback=lane.guard(then_dead_letters))

        await self._consumer.call(delete)

    def _declare(self, lane: Lane, done: Ready) -> None:
        declare_queues(lane, self.queue, self.dead_letter_queue, self._arguments, done)

    def _confirm_mode(self, lane: Lane, done: Any) -> None:
        confirms = Confirms(lane, self._publisher, queue_gone=self._queue_gone)
        lane.state = confirms
        lane.channel.add_on_return_callback(lane.guard(confirms.on_return))
        lane.channel.confirm_delivery(
            ack_nack_callback=lane.guard(confirms.on_confirm), callback=lambda _: done()
        )

    def _queue_gone(self, reason: str) -> None:
        """A published message found no queue: the queue was deleted, and the publisher's
        new connection declares it again. The other connections' channels may still know
        the deleted queue, and RabbitMQ 3.10 can then answer their basic.get with
        get-empty, and fail their consumer's cancel with 541 INTERNAL_ERROR, while the new
        queue holds messages: replace them too."""
        log.warning("queue %s was gone (%s): renewing the consumer connections", self.queue, reason)
        self._consumer.renew(reason)
        if self._prefetcher is not None:
            self._prefetcher.connection.renew(reason)

    def _requeue_orphan(self, delivery: Delivery | None) -> None:
        if delivery is not None:
            self.requeue(delivery)


def _nothing(lane: Lane, request: Request[None]) -> None:
    request.succeed(None)

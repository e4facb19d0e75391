"""The broker: one durable quorum queue (and its dead-letter queue) on RabbitMQ."""

from __future__ import annotations

import collections
import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

import attrs
import pika

from workflows.adapters.rabbitmq.connection import AmqpConnection, Lane, Ready, Refusal, Request
from workflows.application.ports import MessagePublisher
from workflows.domain.errors import DependencyUnavailable

log = logging.getLogger(__name__)

PERSISTENT = pika.BasicProperties(delivery_mode=2, content_type="text/plain")
CONSUMER_LANES = 8
"""Channels of a process's consumer connection: how many basic.get it can have on the
wire at once. A basic.get takes a message only for a consume call waiting for one. No
prefetching consumer (basic.consume): messages prefetched into one process would be
missing to the others' consume calls, and every message handed back unused to a quorum
queue counts towards its x-delivery-limit, so idle prefetching would dead-letter healthy
workflows."""


@attrs.frozen
class Delivery:
    """A message taken with basic.get, unacked. Its tag is only valid on the channel that
    delivered it (`lane` of connection `generation`); once that channel is gone the
    broker requeues it."""

    body: bytes
    tag: int
    generation: int
    lane: int


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
    """

    def __init__(
        self,
        url: str,
        *,
        queue: str = "workflows",
        timeout: float = 5.0,
        arguments: Mapping[str, object] | None = None,
        consumer_lanes: int = CONSUMER_LANES,
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

    async def start(self) -> None:
        """Connect both and declare the queues. When the broker is unreachable, raise
        DependencyUnavailable but keep running: the next call connects again."""
        self._publisher.start()
        self._consumer.start()
        try:
            await self._publisher.call(_nothing)
            await self._consumer.call(_nothing)
        except DependencyUnavailable:
            raise
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await self._publisher.stop()
        await self._consumer.stop()

    async def publish(self, uuids: Sequence[UUID]) -> None:
        """Publish the whole batch at once, then wait for the broker's confirms of all of
        it (it confirms many with one `multiple` ack): one wait per batch, not a round trip
        per message, and batches of concurrent callers are on the wire together."""
        bodies = [str(uuid).encode() for uuid in uuids]
        if not bodies:
            return

        def publish(lane: Lane, request: Request[None]) -> None:
            confirms: _Confirms = lane.state
            confirms.publish(self.queue, bodies, request)

        await self._publisher.call(publish, exclusive=False)

    async def get(self, *, dead: bool = False) -> Delivery | None:
        """Take the next message (of the dead-letter queue, with `dead`), unacked; None
        when the queue is empty."""
        name = self.dead_letter_queue if dead else self.queue

        def get(lane: Lane, request: Request[Delivery | None]) -> None:
            generation = self._consumer.generation

            def got(_channel: Any, method: Any, _properties: Any, body: bytes | None) -> None:
                tag = method.delivery_tag
                request.succeed(Delivery(body or b"", tag, generation, lane.number))

            lane.on_get_empty = lambda: request.succeed(None)
            lane.channel.basic_get(name, lane.guard(got), auto_ack=False)

        return await self._consumer.call(get, on_orphan=self._requeue_orphan)

    def ack(self, delivery: Delivery) -> None:
        """Remove the message, before any later call on this broker; never raises."""
        self._consumer.post(
            lambda lane: lane.channel.basic_ack(delivery.tag),
            generation=delivery.generation,
            lane=delivery.lane,
        )

    def requeue(self, delivery: Delivery) -> None:
        """Hand the message back to the queue, before any later call; never raises."""
        self._consumer.post(
            lambda lane: lane.channel.basic_nack(delivery.tag, requeue=True),
            generation=delivery.generation,
            lane=delivery.lane,
        )

    async def depth(self) -> int:
        """Messages ready in the queue (not counting those taken and not yet acked)."""

        def declare(lane: Lane, request: Request[int]) -> None:
            def declared(frame: Any) -> None:
                request.succeed(int(frame.method.message_count))

            lane.channel.queue_declare(self.queue, passive=True, callback=lane.guard(declared))

        return await self._consumer.call(declare)

    async def ping(self) -> None:
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
        self._declare_queue(
            lane,
            self.dead_letter_queue,
            {"x-queue-type": "quorum"},
            then=lambda: self._declare_queue(lane, self.queue, self._arguments, then=done),
        )

    def _declare_queue(
        self, lane: Lane, name: str, arguments: Mapping[str, object], *, then: Ready
    ) -> None:
        """Declare queue `name`, then call `then`.

        RabbitMQ fixes a queue's arguments when it first declares it, and refuses a
        declare with other ones (406 PRECONDITION_FAILED, closing the channel): say
        MAX_DELIVERY_ATTEMPTS changed since, or something else made a queue of that name.
        Then use the queue as it is, on a new channel: a delivery limit other than the
        configured one is better than a service that cannot publish or consume at all.
        """

        def declared(_frame: Any) -> None:
            lane.refusal = None
            then()

        def keep_existing(reply_text: str) -> None:
            log.warning(
                "rabbitmq queue %r exists with arguments other than the configured %r (%s): "
                "using it as it is, its arguments kept. %s",
                name,
                dict(arguments),
                reply_text,
                _how_to_change(name, arguments),
            )
            lane.channel.queue_declare(name, passive=True, callback=lambda _: then())

        lane.refusal = Refusal(pika.spec.PRECONDITION_FAILED, keep_existing)
        lane.channel.queue_declare(name, durable=True, arguments=arguments, callback=declared)

    def _confirm_mode(self, lane: Lane, done: Any) -> None:
        confirms = _Confirms(lane, self._publisher)
        lane.state = confirms
        lane.channel.add_on_return_callback(lane.guard(confirms.on_return))
        lane.channel.confirm_delivery(
            ack_nack_callback=lane.guard(confirms.on_confirm), callback=lambda _: done()
        )

    def _requeue_orphan(self, delivery: Delivery | None) -> None:
        if delivery is not None:
            self.requeue(delivery)


class _Confirms:
    """Publisher confirms of one channel in confirm mode. The broker numbers the channel's
    messages 1, 2, 3, ... from its confirm.select and acks them by that tag, often many at
    once (`multiple`); a batch is confirmed once every tag up to its last one is."""

    def __init__(self, lane: Lane, connection: AmqpConnection) -> None:
        self._lane = lane
        self._connection = connection
        self.published = 0  # the tag of the last message published
        self.settled = 0  # every tag up to this one is acked
        self._singles: set[int] = set()  # tags above `settled` acked one by one
        self._batches: collections.deque[tuple[int, Request[None]]] = collections.deque()

    def publish(self, queue: str, bodies: Sequence[bytes], request: Request[None]) -> None:
        channel = self._lane.channel
        for body in bodies:
            channel.basic_publish("", queue, body, PERSISTENT, mandatory=True)
        self.published += len(bodies)
        self._batches.append((self.published, request))

    def on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag: int = method.delivery_tag
        if isinstance(method, pika.spec.Basic.Nack):
            # The broker could not take it: drop the connection, which retries every
            # batch not yet confirmed once on a new one (a duplicate is skipped later).
            self._connection.broken(
                f"the broker nacked message {tag} (multiple: {method.multiple})"
            )
            return
        if method.multiple:
            self.settled = max(self.settled, tag)
            self._singles = {single for single in self._singles if single > tag}
        elif tag > self.settled:
            self._singles.add(tag)
        while self.settled + 1 in self._singles:
            self.settled += 1
            self._singles.remove(self.settled)
        while self._batches and self._batches[0][0] <= self.settled:
            self._batches.popleft()[1].succeed(None)

    def on_return(self, _channel: Any, method: Any, _properties: Any, body: bytes) -> None:
        # A mandatory message that no queue took (say its queue was deleted): the broker
        # returns it, then acks it all the same, though nothing holds it. Drop the
        # connection: the new one declares the queue again and the batches are retried.
        self._connection.broken(f"the broker returned message {body!r}: {method.reply_text}")


def _nothing(lane: Lane, request: Request[None]) -> None:
    request.succeed(None)


def _how_to_change(queue: str, arguments: Mapping[str, object]) -> str:
    """The operator's ways to change the arguments of an existing queue."""
    delete = (
        "To change any of them, delete the queue once it is empty and restart the service, "
        "which declares it anew with the configured ones."
    )
    limit = arguments.get("x-delivery-limit")
    if limit is None:
        return delete
    policy = json.dumps({"delivery-limit": limit})
    return (
        "A policy can lower its delivery limit (a quorum queue applies the lower of the "
        f"policy's and its own): rabbitmqctl set_policy {queue}-limit '^{re.escape(queue)}$' "
        f"'{policy}' --apply-to queues. {delete}"
    )

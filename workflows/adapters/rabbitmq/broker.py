"""The broker: one durable quorum queue (and its dead-letter queue) on RabbitMQ."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import time
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
wire at once, for the consume calls that find no prefetched message."""


@attrs.frozen
class Delivery:
    """A message taken with basic.get, or delivered to the prefetching consumer
    (`prefetched`), unacked. Its tag is only valid on the channel that delivered it
    (`lane` of that connection's `generation`); once that channel is gone the broker
    requeues it."""

    body: bytes
    tag: int
    generation: int
    lane: int
    prefetched: bool = False


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
        timeout: float = 5.0,
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
        self._prefetch = prefetch
        self._held: collections.deque[Delivery] = collections.deque()
        self._consumer_tag = ""
        self._prefetch_idle = prefetch_idle
        self._last_asked = 0.0  # time.monotonic() of the last get()
        self._taken = 0  # prefetched messages handed out and not yet acked or requeued
        self._idle_watch: asyncio.TimerHandle | None = None
        self._pausing: asyncio.Task[None] | None = None
        self._prefetcher = (
            AmqpConnection(parameters, lanes=1, setup=self._consume_ahead, timeout=timeout)
            if prefetch > 0
            else None
        )

    @property
    def held(self) -> int:
        """Prefetched messages this process holds for its next consume calls."""
        return len(self._held)

    async def start(self) -> None:
        """Connect and declare the queues. When the broker is unreachable, raise
        DependencyUnavailable but keep running: the next call connects again."""
        self._publisher.start()
        self._consumer.start()
        if self._prefetcher is not None:
            self._prefetcher.start()
            self._last_asked = time.monotonic()
            self._watch_idle()
        try:
            await self._publisher.call(_nothing)
            await self._consumer.call(_nothing)
            if self._prefetcher is not None:
                await self._prefetcher.call(_nothing)
        except DependencyUnavailable:
            raise
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self._idle_watch is not None:
            self._idle_watch.cancel()
            self._idle_watch = None
        if self._pausing is not None:
            await asyncio.shield(self._pausing)
        if self._prefetcher is not None and self._prefetcher.running:
            await self._give_back_held()
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
            confirms: _Confirms = lane.state
            confirms.publish(self.queue, bodies, request)

        await self._publisher.call(publish, exclusive=False)

    async def get(self, *, dead: bool = False) -> Delivery | None:
        """Take the next message (of the dead-letter queue, with `dead`), unacked; None
        when the queue is empty."""
        name = self.dead_letter_queue if dead else self.queue
        if not dead and self._prefetcher is not None:
            self._last_asked = time.monotonic()
            held = self._take_held(self._prefetcher)
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

    def ack(self, delivery: Delivery) -> None:
        """Remove the message, before any later call on this broker; never raises."""
        self._taken -= delivery.prefetched
        self._delivered_by(delivery).post(
            lambda lane: lane.channel.basic_ack(delivery.tag),
            generation=delivery.generation,
            lane=delivery.lane,
        )

    def requeue(self, delivery: Delivery) -> None:
        """Hand the message back to the queue, before any later call; never raises."""
        self._taken -= delivery.prefetched
        self._delivered_by(delivery).post(
            lambda lane: lane.channel.basic_nack(delivery.tag, requeue=True),
            generation=delivery.generation,
            lane=delivery.lane,
        )

    def _delivered_by(self, delivery: Delivery) -> AmqpConnection:
        if delivery.prefetched and self._prefetcher is not None:
            return self._prefetcher
        return self._consumer

    def _take_held(self, prefetcher: AmqpConnection) -> Delivery | None:
        """The oldest prefetched message still valid (its connection's), if any; (re)open
        the prefetching connection when it is down or paused, for the calls to come."""
        if self._pausing is not None:
            return None  # giving back what it held: basic.get meanwhile
        if not prefetcher.running:  # paused after idling: consume again
            prefetcher.start()
            prefetcher.connect()
            self._watch_idle()
            return None
        if not prefetcher.ready:
            self._held.clear()  # their connection is gone: the broker requeued them
            prefetcher.connect()
            return None
        while self._held:
            held = self._held.popleft()
            if held.generation == prefetcher.generation:
                self._taken += 1
                return held
        return None

    def _consume_ahead(self, lane: Lane, done: Ready) -> None:
        """The prefetching connection's setup: declare the queues, then consume with at
        most `prefetch` messages unacked, each held until a consume call takes it."""
        assert self._prefetcher is not None
        generation = self._prefetcher.generation + 1  # this connection's, once it is ready

        def on_message(_channel: Any, method: Any, _properties: Any, body: bytes) -> None:
            tag = method.delivery_tag
            self._held.append(Delivery(body or b"", tag, generation, lane.number, True))

        def on_cancelled(_frame: Any) -> None:
            # The broker cancelled the consumer (say its queue was deleted): start anew.
            assert self._prefetcher is not None
            self._prefetcher.broken("the broker cancelled the prefetching consumer")

        def consume(_frame: Any) -> None:
            lane.channel.add_on_cancel_callback(lane.guard(on_cancelled))
            self._consumer_tag = lane.channel.basic_consume(
                self.queue, lane.guard(on_message), auto_ack=False, callback=lambda _frame: done()
            )

        self._declare(
            lane, lambda: lane.channel.basic_qos(prefetch_count=self._prefetch, callback=consume)
        )

    def _watch_idle(self) -> None:
        """Check every half `prefetch_idle` whether this process was asked for nothing
        since; then pause the prefetching (`_pause`) until the next get()."""
        if self._idle_watch is not None:
            self._idle_watch.cancel()
        loop = asyncio.get_running_loop()
        self._idle_watch = loop.call_later(self._prefetch_idle / 2, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_watch = None
        prefetcher = self._prefetcher
        if prefetcher is None or not prefetcher.running or self._pausing is not None:
            return
        # Not while a consume still has one of its messages: its ack would find the
        # channel closed, and the message would come back counted.
        if self._taken > 0 or time.monotonic() - self._last_asked < self._prefetch_idle:
            self._watch_idle()
            return
        self._pausing = asyncio.ensure_future(self._pause(prefetcher))

    async def _pause(self, prefetcher: AmqpConnection) -> None:
        try:
            await self._give_back_held()
            await prefetcher.stop()
        except Exception as error:  # a background task: nothing may escape it
            log.warning("pausing the prefetching consumer failed: %r", error)
        finally:
            self._pausing = None

    async def _give_back_held(self) -> None:
        """Stop consuming, publish the held messages anew, then ack them: back in the
        queue without a delivery counted. If the broker fails meanwhile, closing the
        connection gives them back instead (counted)."""
        prefetcher = self._prefetcher
        if prefetcher is None or not prefetcher.ready:
            self._held.clear()
            return

        def cancel(lane: Lane, request: Request[None]) -> None:
            lane.channel.basic_cancel(
                self._consumer_tag, callback=lane.guard(lambda _frame: request.succeed(None))
            )

        try:
            await prefetcher.call(cancel)  # deliveries sent before its answer are held now
            held = [d for d in self._held if d.generation == prefetcher.generation]
            self._held.clear()
            await self._publish([d.body for d in held])
        except DependencyUnavailable as error:
            log.warning("prefetched messages given back unpublished: %s", error)
            return
        if not held:
            return

        def ack_held(lane: Lane) -> None:  # never handed out: not counted in _taken
            for delivery in held:
                lane.channel.basic_ack(delivery.tag)

        prefetcher.post(ack_held, generation=held[0].generation, lane=held[0].lane)

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

"""The prefetching consumer: messages held in this process ahead of its consume calls."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pika

from workflows.adapters.rabbitmq.connection import AmqpConnection
from workflows.adapters.rabbitmq.delivery import Delivery
from workflows.adapters.rabbitmq.lanes import Lane, Ready, Request, Setup
from workflows.domain.errors import DependencyUnavailable

log = logging.getLogger(__name__)


class Prefetcher:
    """The prefetching consumer of a RabbitMqBroker (see there): a connection of its own
    consumes the queue with up to `prefetch` messages unacked, each held until a consume
    call takes it (`take`). Its setup declares the queues with `declare`; what it holds it
    gives back, published anew with `publish` and acked, when it stops or after
    `prefetch_idle` seconds unasked."""

    def __init__(
        self,
        parameters: pika.ConnectionParameters,
        *,
        queue: str,
        prefetch: int,
        prefetch_idle: float,
        timeout: float,
        declare: Setup,
        publish: Callable[[Sequence[bytes]], Awaitable[None]],
    ) -> None:
        self._queue = queue
        self._prefetch = prefetch
        self._declare = declare
        self._publish = publish
        self._held: collections.deque[Delivery] = collections.deque()
        self._consumer_tag = ""
        self._prefetch_idle = prefetch_idle
        self._last_asked = 0.0  # time.monotonic() of the last get()
        self._consuming_since = 0.0  # time.monotonic() when the consumer last started
        self._taken = 0  # prefetched messages handed out and not yet acked or requeued
        self._idle_watch: asyncio.TimerHandle | None = None
        self._pausing: asyncio.Task[None] | None = None
        self._asked_while_pausing = False  # consume again once the pause is done
        self._stopping = False
        self.connection = AmqpConnection(
            parameters, lanes=1, setup=self._consume_ahead, timeout=timeout
        )

    @property
    def held(self) -> int:
        """Prefetched messages this process holds for its next consume calls."""
        return len(self._held)

    def start(self) -> None:
        self.connection.start()
        self._last_asked = time.monotonic()
        self._watch_idle()

    async def stop(self) -> None:
        self._stopping = True
        if self._idle_watch is not None:
            self._idle_watch.cancel()
            self._idle_watch = None
        if self._pausing is not None:
            await asyncio.shield(self._pausing)
        if self.connection.running:
            await self._give_back_held()
            await self.connection.stop()

    def take(self) -> Delivery | None:
        """A get() asks: the oldest held message, if any (see `_take_held`)."""
        self._last_asked = time.monotonic()
        return self._take_held(self.connection)

    def settled(self) -> AmqpConnection:
        """A message it handed out is being acked or requeued: the connection for that."""
        self._taken -= 1
        return self.connection

    def _take_held(self, prefetcher: AmqpConnection) -> Delivery | None:
        """The oldest prefetched message still valid (its connection's), if any; (re)open
        the prefetching connection when it is down or paused, for the calls to come."""
        if self._pausing is not None:
            # Giving back what it held: basic.get meanwhile, and consume again once that
            # is done, as the get would have made it had it come a moment later.
            self._asked_while_pausing = True
            return None
        if not prefetcher.running:  # paused after idling: consume again
            self._resume(prefetcher)
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
        generation = self.connection.generation + 1  # this connection's, once it is ready

        def on_message(_channel: Any, method: Any, _properties: Any, body: bytes) -> None:
            tag = method.delivery_tag
            self._held.append(Delivery(body or b"", tag, generation, lane.number, True))

        def on_cancelled(_frame: Any) -> None:
            # The broker cancelled the consumer (say its queue was deleted): start anew.
            self.connection.broken("the broker cancelled the prefetching consumer")

        def consume(_frame: Any) -> None:
            lane.channel.add_on_cancel_callback(lane.guard(on_cancelled))
            self._consumer_tag = lane.channel.basic_consume(
                self._queue, lane.guard(on_message), auto_ack=False, callback=consuming
            )

        def consuming(_frame: Any) -> None:
            self._consuming_since = time.monotonic()
            done()

        self._declare(
            lane, lambda: lane.channel.basic_qos(prefetch_count=self._prefetch, callback=consume)
        )

    def _watch_idle(self) -> None:
        """Check every half `prefetch_idle` whether this process was asked for nothing
        since, and its consumer has been consuming that long; then pause the prefetching
        (`_pause`) until the next get()."""
        if self._idle_watch is not None:
            self._idle_watch.cancel()
        loop = asyncio.get_running_loop()
        self._idle_watch = loop.call_later(self._prefetch_idle / 2, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_watch = None
        prefetcher = self.connection
        if not prefetcher.running or self._pausing is not None:
            return
        # Not while a consume still has one of its messages: its ack would find the
        # channel closed, and the message would come back counted. Not before the
        # consumer has been consuming for `prefetch_idle` either: a get() restarted it,
        # and a connection slower to open than that would be stopped before it held
        # anything, at every get.
        since = max(self._last_asked, self._consuming_since)
        if (
            self._taken > 0
            or not prefetcher.ready
            or time.monotonic() - since < self._prefetch_idle
        ):
            self._watch_idle()
            return
        self._pausing = asyncio.ensure_future(self._pause(prefetcher))

    def _resume(self, prefetcher: AmqpConnection) -> None:
        prefetcher.start()
        prefetcher.connect()
        self._watch_idle()

    async def _pause(self, prefetcher: AmqpConnection) -> None:
        self._asked_while_pausing = False
        try:
            await self._give_back_held()
            await prefetcher.stop()
        except Exception as error:  # a background task: nothing may escape it
            log.warning("pausing the prefetching consumer failed: %r", error)
        finally:
            self._pausing = None
        if self._asked_while_pausing and not self._stopping and not prefetcher.running:
            self._resume(prefetcher)

    async def _give_back_held(self) -> None:
        """Stop consuming, publish the held messages anew, then ack them: back in the
        queue without a delivery counted. If the broker fails meanwhile, closing the
        connection gives them back instead (counted)."""
        prefetcher = self.connection
        if not prefetcher.ready:
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

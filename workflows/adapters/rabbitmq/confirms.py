"""Publisher confirms: a batch of messages published at once, confirmed as a whole."""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import pika

from workflows.adapters.rabbitmq.connection import AmqpConnection
from workflows.adapters.rabbitmq.lanes import Lane, Request

PERSISTENT = pika.BasicProperties(delivery_mode=2, content_type="text/plain")


class Confirms:
    """Publisher confirms of one channel in confirm mode. The broker numbers the channel's
    messages 1, 2, 3, ... from its confirm.select and acks them by that tag, often many at
    once (`multiple`); a batch is confirmed once every tag up to its last one is."""

    def __init__(
        self,
        lane: Lane,
        connection: AmqpConnection,
        queue_gone: Callable[[str], None] | None = None,
    ) -> None:
        self._lane = lane
        self._connection = connection
        self._queue_gone = queue_gone
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
        reason = f"the broker returned message {body!r}: {method.reply_text}"
        self._connection.broken(reason)
        if self._queue_gone is not None:
            self._queue_gone(reason)

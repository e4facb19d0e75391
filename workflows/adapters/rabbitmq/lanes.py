"""What runs on an AmqpConnection: its channels ("lanes") and the requests sent on them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

if TYPE_CHECKING:
    from workflows.adapters.rabbitmq.connection import AmqpConnection

T = TypeVar("T")
Ready = Callable[[], None]
Setup = Callable[["Lane", Ready], None]
"""Prepares a new connection's lane (declares the queues...), then calls `Ready`."""


class Refusal(NamedTuple):
    """A channel error that a setup expects from its request and handles (Lane.refusal)."""

    reply_code: int  # say 406 PRECONDITION_FAILED
    then: Callable[[str], None]  # goes on, on the lane's new channel, given the reply text


class Lane:
    """A channel of the connection: runs one exclusive request at a time (a basic.get, a
    queue.declare...), any number of pipelined ones (publishes awaiting confirms)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.number: int = channel.channel_number
        self.request: Request[Any] | None = None  # the exclusive request it runs
        self.on_get_empty: Callable[[], None] | None = None
        self.state: Any = None  # what the owner keeps per channel (publisher confirms)
        self.dropped = False  # its connection was given up: ignore what it still reports
        self.refusal: Refusal | None = None
        """Set by a setup while its request may be refused with a channel error (a
        queue.declare with arguments other than the existing queue's): the broker then
        closes the channel, not the connection, so the lane gets a new channel and the
        setup goes on with `refusal.then`, where any other channel error drops the
        connection. Cleared by the setup once answered, and by the channel's closing."""

    def guard(self, callback: Callable[..., None]) -> Callable[..., None]:
        """`callback`, unless this lane's connection has been dropped by then: a request
        of a dropped connection is retried or failed already, and anything its broker
        still sends is void (what it delivered is requeued)."""

        def guarded(*args: Any) -> None:
            if not self.dropped:
                callback(*args)

        return guarded

    def got_empty(self, _frame: Any) -> None:
        on_get_empty, self.on_get_empty = self.on_get_empty, None
        if on_get_empty is not None and not self.dropped:
            on_get_empty()


class Request(Generic[T]):
    """Something to do on the connection: `run(lane, request)` sends it, and pika's
    callbacks later `succeed` or `fail` it, which settles the caller's future."""

    def __init__(
        self,
        connection: AmqpConnection,
        run: Callable[[Lane, Request[T]], None],
        future: asyncio.Future[T],
        *,
        exclusive: bool,
        on_orphan: Callable[[T], None] | None,
    ) -> None:
        self._connection = connection
        self.run = run
        self.future = future
        self.exclusive = exclusive
        self.on_orphan = on_orphan
        self.retried = False
        self.sent_at = 0.0
        self.lane: Lane | None = None
        self.done = False

    def succeed(self, result: T) -> None:
        if self.done:
            return
        self.done = True
        self._connection.finished(self)
        if self.future.cancelled():
            if self.on_orphan is not None:
                self.on_orphan(result)  # the caller has gone: hand the result back
        elif not self.future.done():
            self.future.set_result(result)

    def fail(self, error: Exception) -> None:
        if self.done:
            return
        self.done = True
        self._connection.finished(self)
        if not self.future.done():
            self.future.set_exception(error)

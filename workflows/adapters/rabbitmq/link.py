"""The link under an AmqpConnection: one pika connection at a time, its lanes opened.

A connection is opened on pika's asyncio adapter, on the running event loop; its channels
are opened as lanes and set up (the first with `setup`, each with `lane_setup`); a lane
whose setup expects a refusal (Lane.refusal) gets a new channel. Whatever else closes the
connection or one of its channels drops it: what becomes of the requests then is the
AmqpConnection's (`_broken`, `_fail_waiting`), as is sending them once the lanes are
ready (`_dispatch`).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import logging
import time
from typing import Any

import pika
from pika.adapters.asyncio_connection import AsyncioConnection

from workflows.adapters.rabbitmq.lanes import Lane, Ready, Setup
from workflows.domain.errors import DependencyUnavailable

log = logging.getLogger(__name__)


class Link(abc.ABC):
    """A connection of `lanes` channels, opened by `_connect` and dropped by
    `_drop_connection`; `generation` counts the connections that became ready."""

    def __init__(
        self,
        parameters: pika.ConnectionParameters,
        *,
        lanes: int,
        setup: Setup,
        lane_setup: Setup | None,
    ) -> None:
        self._parameters = parameters
        self._lane_count = lanes
        self._setup = setup
        self._lane_setup = lane_setup
        self.generation = 0  # bumped for every connection opened
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: Any = None
        self._connecting_since = 0.0
        self._ready = False
        self._lanes: list[Lane] = []
        self._by_number: dict[int, Lane] = {}
        self._free: list[Lane] = []
        self._closing: set[Any] = set()
        self._stopping = False  # AmqpConnection.stop() is letting the last requests finish
        # Why the broker blocks this link's publishes (connection.blocked: a memory or disk
        # alarm), until it unblocks or a publish is confirmed; kept across a reconnect, as
        # the broker tells a new connection only once it publishes.
        self.blocked: str | None = None

    @property
    def ready(self) -> bool:
        """Connected, its lanes set up (`generation` is this connection's)."""
        return self._ready

    # --- what the AmqpConnection does with its requests ---------------------------------

    @abc.abstractmethod
    def _dispatch(self) -> None: ...

    @abc.abstractmethod
    def _broken(self, error: BaseException) -> None: ...

    @abc.abstractmethod
    def _fail_waiting(self, error: Exception) -> None: ...

    @abc.abstractmethod
    def _finish_stop_if_idle(self) -> None: ...

    # --- connecting ---------------------------------------------------------------------

    def _connect(self) -> None:
        self._connecting_since = time.monotonic()
        self._connection = AsyncioConnection(
            self._parameters,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self._loop,
        )

    def _on_open(self, connection: Any) -> None:
        if connection is not self._connection:
            return
        _send_bursts_at_once(connection)
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        opened: list[Lane] = []

        def on_channel(channel: Any) -> None:
            lane = Lane(channel)
            self._watch_channel(lane)
            opened.append(lane)
            if len(opened) == self._lane_count:
                self._setup(opened[0], lambda: self._set_up_lanes(connection, opened))

        for _ in range(self._lane_count):
            connection.channel(on_open_callback=on_channel)

    def _watch_channel(self, lane: Lane) -> None:
        """Hear of the closing of `lane`'s channel and of its basic.get-empty answers."""
        channel = lane.channel
        channel.add_on_close_callback(
            lambda closed, reason: self._on_channel_closed(lane, closed, reason)
        )
        channel.add_callback(lane.got_empty, [pika.spec.Basic.GetEmpty], one_shot=False)

    def _reopen(self, lane: Lane, then: Ready) -> None:
        """Give `lane` a new channel of the connection, then call `then`."""

        def on_channel(channel: Any) -> None:
            lane.channel = channel
            lane.number = channel.channel_number
            self._watch_channel(lane)
            then()

        self._connection.channel(on_open_callback=on_channel)

    def _set_up_lanes(self, connection: Any, lanes: list[Lane]) -> None:
        remaining = len(lanes)

        def one_done() -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                self._on_ready(connection, lanes)

        for lane in lanes:
            if self._lane_setup is None:
                one_done()
            else:
                self._lane_setup(lane, one_done)

    def _on_ready(self, connection: Any, lanes: list[Lane]) -> None:
        if connection is not self._connection:
            return
        self.generation += 1
        self._lanes = lanes
        self._by_number = {lane.number: lane for lane in lanes}
        self._free = list(reversed(lanes))
        self._ready = True
        self._dispatch()

    def _on_blocked(self, connection: Any, frame: Any) -> None:
        if connection is self._connection:
            reason = str(getattr(frame.method, "reason", "") or "a resource alarm")
            if self.blocked is None:
                log.warning("rabbitmq blocks publishing: %s", reason)
            self.blocked = reason

    def _on_unblocked(self, connection: Any, _frame: Any) -> None:
        if connection is self._connection:
            self.unblocked()

    def unblocked(self) -> None:
        """The broker takes publishes again (it said so, or confirmed one)."""
        if self.blocked is not None:
            log.info("rabbitmq takes publishes again")
            self.blocked = None

    def _on_open_error(self, connection: Any, error: BaseException) -> None:
        self._closing.discard(connection)
        if connection is self._connection:
            self._connection = None
            self._fail_waiting(DependencyUnavailable("rabbitmq", repr(error)))
        elif self._stopping:
            self._finish_stop_if_idle()

    # --- closing ------------------------------------------------------------------------

    def _on_closed(self, connection: Any, reason: BaseException) -> None:
        self._closing.discard(connection)
        if connection is self._connection:
            log.log(self._loss_level(reason), "rabbitmq connection lost: %r", reason)
            self._broken(reason)
        elif self._stopping:
            self._finish_stop_if_idle()

    def _on_channel_closed(self, lane: Lane, channel: Any, reason: BaseException) -> None:
        if self._connection is None or channel.connection is not self._connection:
            return
        refusal, lane.refusal = lane.refusal, None
        if (
            refusal is not None
            and isinstance(reason, pika.exceptions.ChannelClosedByBroker)
            and reason.reply_code == refusal.reply_code
        ):
            self._reopen(lane, lambda: refusal.then(reason.reply_text))
            return
        log.log(
            self._loss_level(reason),
            "rabbitmq channel %d closed: %r",
            channel.channel_number,
            reason,
        )
        self._broken(reason)

    def _loss_level(self, reason: BaseException) -> int:
        """A connection blocked for the timeout is dropped every few seconds while an alarm
        lasts: the alarm was logged once (`_on_blocked`), each such loss is only INFO."""
        timed_out = isinstance(reason, pika.exceptions.ConnectionBlockedTimeout)
        return logging.INFO if timed_out and self.blocked is not None else logging.WARNING

    def _drop_connection(self) -> None:
        self._ready = False
        connection, self._connection = self._connection, None
        for lane in self._lanes:
            lane.dropped = True
        self._lanes, self._by_number, self._free = [], {}, []
        if connection is not None and not (connection.is_closing or connection.is_closed):
            self._closing.add(connection)
            try:
                connection.close()
            except Exception as error:
                log.debug("closing a broken rabbitmq connection: %r", error)
                self._closing.discard(connection)


def _send_bursts_at_once(connection: Any) -> None:
    """pika buffers each frame it writes and, once the socket is writable, sends its buffer
    one frame per system call: three per published message, and on loopback TCP each
    call costs as much as decoding a frame. Join the buffer first, so that a burst (a
    batch of messages; an ack and the next basic.get) leaves in one call. Left as it is,
    harmlessly, if pika's transport is not built as expected."""
    transport: Any = getattr(connection, "_transport", None)
    produce = getattr(transport, "_produce", None)
    buffers = getattr(transport, "_tx_buffers", None)
    if produce is None or not isinstance(buffers, collections.deque):
        log.debug("pika's transport has no _produce/_tx_buffers: frames sent one by one")
        return

    def produce_joined() -> None:
        buffers = transport._tx_buffers
        if len(buffers) > 1:
            joined = b"".join(buffers)
            buffers.clear()
            buffers.append(joined)
        produce()

    transport._produce = produce_joined

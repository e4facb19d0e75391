"""One AMQP connection driven by pika's asyncio adapter on the event loop itself.

No thread: pika's asynchronous API runs its I/O on the running event loop (uvloop in
production), so a request costs no hand-off between threads, no wake-up of another
thread, no contention for the GIL; each frame is encoded and decoded exactly where its
caller awaits it.

Requests are pipelined: a connection has several channels ("lanes"), and a lane's
request is on the wire while others are, so a round trip to the broker costs each caller
its latency, not a place in a line.

Failures: when the connection or one of its channels fails, every request in flight on it
is given one more try on a new connection (the broker has requeued whatever the old one
held unacknowledged); one that fails again, or that waits on a connection that cannot be
opened, fails with DependencyUnavailable. A request unanswered after `timeout` seconds
drops the connection and fails. Nothing is connected until a request needs it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

import pika
from pika.adapters.asyncio_connection import AsyncioConnection

from workflows.domain.errors import DependencyUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
Ready = Callable[[], None]
Setup = Callable[["Lane", Ready], None]
"""Prepares a new connection's lane (declares the queues...), then calls `Ready`."""
WATCH_INTERVAL = 0.25  # seconds between checks for requests the broker leaves unanswered


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
        self._connection._finished(self)
        if self.future.cancelled():
            if self.on_orphan is not None:
                self.on_orphan(result)  # the caller has gone: hand the result back
        elif not self.future.done():
            self.future.set_result(result)

    def fail(self, error: Exception) -> None:
        if self.done:
            return
        self.done = True
        self._connection._finished(self)
        if not self.future.done():
            self.future.set_exception(error)


class AmqpConnection:
    """One connection of `lanes` channels on the running event loop (see the module)."""

    def __init__(
        self,
        parameters: pika.ConnectionParameters,
        *,
        lanes: int,
        setup: Setup,
        lane_setup: Setup | None = None,
        timeout: float,
    ) -> None:
        self._parameters = parameters
        self._lane_count = lanes
        self._setup = setup
        self._lane_setup = lane_setup
        self._timeout = timeout
        self.generation = 0  # bumped for every connection opened
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: Any = None
        self._connecting_since = 0.0
        self._ready = False
        self._lanes: list[Lane] = []
        self._by_number: dict[int, Lane] = {}
        self._free: list[Lane] = []
        self._waiting: collections.deque[Request[Any]] = collections.deque()
        self._in_flight: dict[int, Request[Any]] = {}  # by id(), in the order sent
        self._closing: set[Any] = set()
        self._closed = asyncio.Event()
        self._watcher: asyncio.TimerHandle | None = None
        self._dispatch_soon = False
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._loop is not None and not self._stopping

    @property
    def ready(self) -> bool:
        """Connected, its lanes set up (`generation` is this connection's)."""
        return self._ready

    def connect(self) -> None:
        """Open a connection now if none is open or opening, without a request: for a
        consumer, whose deliveries come unasked (a failed attempt is retried at the next
        call of this)."""
        if self.running and self._connection is None:
            self._connect()

    def start(self) -> None:
        """Accept requests, on the running loop (every call must come from it); the first
        request connects."""
        if self._watcher is not None:
            self._watcher.cancel()
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._watcher = self._loop.call_later(WATCH_INTERVAL, self._watch)

    async def stop(self) -> None:
        """Let the requests already made finish (within `timeout`), then close."""
        if self._loop is None or self._stopping:
            return
        self._stopping = True
        self._closed = asyncio.Event()
        self._finish_stop_if_idle()
        try:
            async with asyncio.timeout(self._timeout):
                await self._closed.wait()
        except TimeoutError:
            log.warning("rabbitmq connection did not close in %ss; dropping it", self._timeout)
            stopped = DependencyUnavailable("rabbitmq", "stopped")
            for request in [*self._waiting, *self._in_flight.values()]:
                request.fail(stopped)
            self._drop_connection()
        finally:
            if self._watcher is not None:
                self._watcher.cancel()
                self._watcher = None
            self._loop = None

    async def call(
        self,
        run: Callable[[Lane, Request[T]], None],
        *,
        exclusive: bool = True,
        on_orphan: Callable[[T], None] | None = None,
    ) -> T:
        """Send a request and await its answer. If the caller is cancelled or times out
        after the answer came, `on_orphan(answer)` gets it, so that nothing is stranded."""
        if not self.running:
            raise DependencyUnavailable("rabbitmq", "the broker adapter is not running")
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()
        request = Request(self, run, future, exclusive=exclusive, on_orphan=on_orphan)
        self._waiting.append(request)
        self._dispatch()
        try:
            async with asyncio.timeout(self._timeout):
                return await future
        except BaseException as error:
            if on_orphan and future.done() and not future.cancelled() and not future.exception():
                on_orphan(future.result())
            if isinstance(error, TimeoutError):
                raise DependencyUnavailable("rabbitmq", f"no answer in {self._timeout}s") from None
            raise

    def post(self, action: Callable[[Lane], None], *, generation: int, lane: int) -> None:
        """Run `action` on the lane numbered `lane` of connection `generation` if that
        channel is still open; never raises. Once that connection is gone, the broker has
        requeued whatever it delivered and left unacknowledged."""
        channel = self._by_number.get(lane)
        if generation != self.generation or channel is None or not channel.channel.is_open:
            return
        try:
            action(channel)
        except Exception as error:
            log.warning("rabbitmq action failed: %r", error)

    def broken(self, reason: str) -> None:
        """The owner saw this connection fail (say, the broker nacked a message): drop it,
        as when the broker closes it."""
        self._broken(DependencyUnavailable("rabbitmq", reason))

    # --- sending ------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Send what waits, as far as free lanes allow; connect first when needed."""
        if not self._ready:
            if self._connection is None and self._waiting:
                self._connect()
            return
        while self._waiting:
            request = self._waiting[0]
            if request.future.done():  # the caller gave up before it was sent: skip it
                self._waiting.popleft()
                continue
            if request.exclusive and not self._free:
                break
            self._waiting.popleft()
            lane = self._free.pop() if request.exclusive else self._lanes[0]
            if request.exclusive:
                lane.request = request
            request.lane = lane
            request.sent_at = time.monotonic()
            self._in_flight[id(request)] = request
            try:
                request.run(lane, request)
            except Exception as error:  # the channel or connection broke under us
                log.warning("rabbitmq request failed: %r", error)
                self._broken(error)
                return
        if self._stopping:
            self._finish_stop_if_idle()

    def _finished(self, request: Request[Any]) -> None:
        """`request` has its answer (from Request.succeed or fail)."""
        self._in_flight.pop(id(request), None)
        lane, request.lane = request.lane, None
        if lane is not None and lane.request is request:
            lane.request = None
            lane.on_get_empty = None
            if not lane.dropped and lane.channel.is_open:
                self._free.append(lane)
        if self._waiting or self._stopping:
            self._dispatch_later()

    def _dispatch_later(self) -> None:
        """Send what waits for a lane once pika's current callback has returned."""
        if not self._dispatch_soon and self._loop is not None:
            self._dispatch_soon = True
            self._loop.call_soon(self._dispatch_now)

    def _dispatch_now(self) -> None:
        self._dispatch_soon = False
        self._dispatch()

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

    def _on_open_error(self, connection: Any, error: BaseException) -> None:
        self._closing.discard(connection)
        if connection is self._connection:
            self._connection = None
            self._fail_waiting(DependencyUnavailable("rabbitmq", repr(error)))
        elif self._stopping:
            self._finish_stop_if_idle()

    # --- failures -----------------------------------------------------------------------

    def _on_closed(self, connection: Any, reason: BaseException) -> None:
        self._closing.discard(connection)
        if connection is self._connection:
            log.warning("rabbitmq connection lost: %r", reason)
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
        log.warning("rabbitmq channel %d closed: %r", channel.channel_number, reason)
        self._broken(reason)

    def _broken(self, error: BaseException) -> None:
        """Drop the connection; retry its requests once on a new one, fail the others."""
        was_ready = self._ready
        self._drop_connection()
        in_flight = list(self._in_flight.values())
        self._in_flight.clear()
        unavailable = (
            error
            if isinstance(error, DependencyUnavailable)
            else DependencyUnavailable("rabbitmq", repr(error))
        )
        retry: list[Request[Any]] = []
        for request in in_flight:
            request.lane = None
            if was_ready and not request.retried and not request.future.done():
                request.retried = True
                retry.append(request)
            else:
                request.fail(unavailable)
        if not was_ready:  # it failed while opening: nothing can be sent
            self._fail_waiting(unavailable)
        self._waiting.extendleft(reversed(retry))
        self._dispatch()
        if self._stopping:
            self._finish_stop_if_idle()

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

    def _fail_waiting(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, collections.deque()
        for request in waiting:
            request.fail(error)
        if self._stopping:
            self._finish_stop_if_idle()

    def _watch(self) -> None:
        """Drop a connection whose broker leaves a request (or the opening) unanswered
        past the timeout."""
        now = time.monotonic()
        late = [r for r in self._in_flight.values() if now - r.sent_at > self._timeout]
        opening = self._connection is not None and not self._ready
        if late or (opening and now - self._connecting_since > self._timeout):
            for request in late:
                request.retried = True  # a hung broker: no second try
            self._broken(DependencyUnavailable("rabbitmq", f"no answer in {self._timeout}s"))
        if self._loop is not None:
            self._watcher = self._loop.call_later(WATCH_INTERVAL, self._watch)

    def _finish_stop_if_idle(self) -> None:
        if not self._stopping or self._waiting or self._in_flight:
            return  # finish those first
        if self._connection is not None:
            self._drop_connection()
        if not self._closing:
            self._closed.set()


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

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

The lanes and the requests sent on them are in `lanes`; opening the connection and its
lanes, and dropping it, in `link` (AmqpConnection's base class).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pika

from workflows.adapters.rabbitmq.lanes import Lane, Request, Setup
from workflows.adapters.rabbitmq.link import Link
from workflows.domain.errors import DependencyUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
WATCH_INTERVAL = 0.25  # seconds between checks for requests the broker leaves unanswered


class AmqpConnection(Link):
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
        super().__init__(parameters, lanes=lanes, setup=setup, lane_setup=lane_setup)
        self._timeout = timeout
        self._waiting: collections.deque[Request[Any]] = collections.deque()
        self._in_flight: dict[int, Request[Any]] = {}  # by id(), in the order sent
        self._closed = asyncio.Event()
        self._watcher: asyncio.TimerHandle | None = None
        self._dispatch_soon = False

    @property
    def running(self) -> bool:
        return self._loop is not None and not self._stopping

    def stalled(self, after: float) -> bool:
        """The broker has left the opening of the connection, or a request, unanswered for
        `after` seconds: it may be hung (a partition drops packets rather than refusing).
        The watcher drops such a connection once `timeout` has passed."""
        now = time.monotonic()
        if self._connection is not None and not self._ready:
            return now - self._connecting_since > after
        return any(now - request.sent_at > after for request in self._in_flight.values())

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

    def renew(self, reason: str) -> None:
        """Replace an open connection with a new one (its requests in flight are retried
        there), as when the broker closes it; one not open yet is left to open. For
        channels that may still know a queue deleted and declared again (`reason`)."""
        if self._ready:
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

    def finished(self, request: Request[Any]) -> None:
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

    # --- failures -----------------------------------------------------------------------

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

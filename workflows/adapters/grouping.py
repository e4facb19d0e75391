"""Grouping: calls that arrive while a batch is in flight share the next batch."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import math
from collections.abc import Coroutine, Iterator
from typing import Any, Generic, TypeVar

from workflows.domain.errors import DependencyUnavailable

In = TypeVar("In")
Out = TypeVar("Out")


class Group(abc.ABC, Generic[In, Out]):
    """Calls that come while earlier ones are on their way to the database wait and go
    together, as one batch, in the next `run` call; each caller gets its own result.

    Nothing waits for company: a call that finds no batch in flight goes at once, so a
    lone request pays no extra latency, and under load each round trip carries every call
    that arrived during the one before. Up to `parallel` batches are in flight at a time.
    With `linger` N, a batch is taken N passes of the event loop later than it could be:
    the calls made meanwhile (requests read in those passes) join it. A pass with nothing
    else to do takes microseconds; under load it is where the other requests arrive.
    Batches run in tasks of their own: a caller that is cancelled stops waiting, and
    `run` can see that (its future is done) and leave its item out.
    """

    def __init__(self, *, max_batch: int, parallel: int, linger: int = 0) -> None:
        self._max_batch = max_batch
        self._parallel = parallel
        self._linger = linger
        self._pending: list[tuple[In, asyncio.Future[Out]]] = []
        self._running = 0
        self._runners: set[asyncio.Task[None]] = set()  # references, so none is collected

    async def call(self, item: In) -> Out:
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._running < self._parallel and not self._collecting():
            # Counted until _drain returns, not until the task's done callbacks run: a
            # call that comes between the two would otherwise wait for a runner that is
            # no longer looking.
            self._running += 1
            runner = asyncio.create_task(self._drain(), name=type(self).__name__)
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        return await future

    def _collecting(self) -> bool:
        """Whether a runner will still take the calls pending now into its batch (so no
        other runner need start for them)."""
        return False

    async def _drain(self) -> None:
        try:
            await self._drain_pending()
        finally:
            self._running -= 1

    async def _drain_pending(self) -> None:
        while self._pending:
            for _ in range(self._linger):
                await asyncio.sleep(0)
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            try:
                await self.run(batch)
            except Exception as error:  # every waiter gets it (503 for DependencyUnavailable)
                for _, future in batch:
                    settle(future, error=error)

    @abc.abstractmethod
    async def run(self, batch: list[tuple[In, asyncio.Future[Out]]]) -> None:
        """Do the batch's work and settle each future (`settle`); an exception that
        escapes settles every future still pending with it."""


def settle(
    future: asyncio.Future[Out], result: Out | None = None, *, error: BaseException | None = None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


Waiting = tuple[tuple[In, float], "asyncio.Future[Any]"]
"""An item, its caller's deadline (the loop's clock; infinite without one), and its future."""
SOME_WAIT = 0.001
"""Seconds a batch whose last deadline has just passed still waits for a connection: the
pool refuses at once a wait of 0, even with a connection free."""


class Outgoing(Generic[In]):
    """A batch of a DeadlineGroup's items on its way to the database.

    Until `take()` an item can still be failed by its caller's deadline (or left by its
    caller); `take()`, called once the connection is there, just before the statement
    goes, gives the items whose callers still wait and binds them to the statement: from
    then on only its outcome settles them."""

    def __init__(self, batch: list[Waiting[In]], wait: float | None = None) -> None:
        self._batch = batch
        self.wait = wait
        """Seconds to wait for a connection (until the last item's deadline); None: the
        pool's own timeout."""
        self.taken: list[Waiting[In]] | None = None

    def take(self) -> list[In]:
        self.taken = [waiting for waiting in self._batch if not waiting[1].done()]
        return [item for (item, _), _ in self.taken]

    def expire(self, now: float, error: BaseException) -> float | None:
        """Fail the items due by `now`, unless taken; the next deadline still to come."""
        if self.taken is not None:
            return None
        for (_, deadline), future in self._batch:
            if future.done():
                continue
            if deadline > now:
                return deadline  # the items came in order of arrival: the others are later
            settle(future, error=error)
        return None


class DeadlineGroup(Group[tuple[In, float], Out]):
    """A Group whose callers (`submit`) each wait at most `within` seconds, from the call,
    for their item to be taken (behind the batch ahead of it, then for its own batch's
    connection): then the caller gets DependencyUnavailable(`dependency`) and its item is
    left out. Its 503 comes after the one timeout, not after the batch ahead has used up
    its own first. Without `within` an item waits as long as its batch does.

    `run` wraps its batch in `_sending`, whose Outgoing it hands to the code that gets
    the connection: that waits for it `outgoing.wait` seconds, then calls `take()`."""

    def __init__(
        self,
        *,
        within: float | None,
        dependency: str,
        max_batch: int,
        parallel: int,
        linger: int = 0,
    ) -> None:
        super().__init__(max_batch=max_batch, parallel=parallel, linger=linger)
        self._within = within
        self._dependency = dependency
        self._untaken: set[Outgoing[In]] = set()  # batches waiting for their connection
        # One timer for the whole group, set for the earliest deadline still to come: on
        # the way of an item that goes in time, the deadline costs a clock read and a test.
        self._alarm: asyncio.TimerHandle | None = None

    def submit(self, item: In) -> Coroutine[Any, Any, Out]:
        """`call` with the item's deadline (a plain function: no coroutine of its own)."""
        if self._within is None:
            return self.call((item, math.inf))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._within
        if self._alarm is None:  # else it is set for an earlier deadline, and moves on
            self._alarm = loop.call_at(deadline, self._expire)
        return self.call((item, deadline))

    def _expire(self) -> None:
        """Fail every item due that is not taken yet; set the alarm for the next one."""
        self._alarm = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        late = DependencyUnavailable(self._dependency, f"no connection within {self._within} s")
        due = 0
        for (_, deadline), future in self._pending:  # in order of arrival
            if deadline > now:
                break
            settle(future, error=late)
            due += 1
        del self._pending[:due]
        next_ones = [self._pending[0][0][1]] if self._pending else []
        for outgoing in self._untaken:
            if (next_one := outgoing.expire(now, late)) is not None:
                next_ones.append(next_one)
        if next_ones:
            self._alarm = loop.call_at(min(next_ones), self._expire)

    @contextlib.contextmanager
    def _sending(self, batch: list[Waiting[In]]) -> Iterator[Outgoing[In]]:
        """`batch` on its way: its Outgoing, failed by its callers' deadlines until taken."""
        wait: float | None = None
        if self._within is not None:
            wait = max(batch[-1][0][1] - asyncio.get_running_loop().time(), SOME_WAIT)
        outgoing = Outgoing(batch, wait)
        self._untaken.add(outgoing)
        try:
            yield outgoing
        finally:
            self._untaken.discard(outgoing)

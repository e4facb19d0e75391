"""Concurrent writes share one statement, one round trip and one commit (GroupCommit)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import psycopg

from workflows.adapters.grouping import Group, settle
from workflows.domain.errors import DependencyUnavailable

log = logging.getLogger(__name__)

In = TypeVar("In")

Waiting = tuple[tuple[In, float], "asyncio.Future[None]"]
"""A row, its caller's deadline (the loop's clock; infinite without one), and its future."""
SOME_WAIT = 0.001
"""Seconds a batch whose last deadline has just passed still waits for a connection: the
pool refuses at once a wait of 0, even with a connection free."""


class Outgoing(Generic[In]):
    """A batch of GroupCommit's rows on its way to the database, for its `write_many`.

    Until `take()` a row can still be failed by its caller's deadline (or left by its
    caller); `take()`, called once the connection is there, just before the statement
    goes, gives the rows whose callers still wait and binds them to the write: from then
    on only its outcome settles them."""

    def __init__(self, batch: list[Waiting[In]], wait: float | None = None) -> None:
        self._batch = batch
        self.wait = wait
        """Seconds to wait for a connection (until the last row's deadline); None: the
        pool's own timeout."""
        self.taken: list[Waiting[In]] | None = None

    def take(self) -> list[In]:
        self.taken = [waiting for waiting in self._batch if not waiting[1].done()]
        return [row for (row, _), _ in self.taken]

    def expire(self, now: float, error: BaseException) -> float | None:
        """Fail the rows due by `now`, unless taken; the next deadline still to come."""
        if self.taken is not None:
            return None
        for (_, deadline), future in self._batch:
            if future.done():
                continue
            if deadline > now:
                return deadline  # the rows came in order of arrival: the others are later
            settle(future, error=error)
        return None


class GroupCommit(Group[tuple[In, float], None]):
    """Rows handed to `add` go to the database together; `add` returns once its row has
    committed.

    `write_many` must be atomic (one autocommit statement, say), and call the batch's
    `take()` once it has its connection, just before it writes the rows that gives. When
    it fails with a data or integrity error (which one row could cause), each row is
    written alone so that only the guilty one fails; any other error fails the whole
    batch. A caller cancelled before its row is taken is left out; after, its row may
    still commit (as a lone write would).

    With `within`, a row waits at most that many seconds from its `add` to be taken
    (behind the batch ahead of it, then for its own batch's connection): then its caller
    gets DependencyUnavailable and the row is left out, nothing of it stored. Its 503
    comes after the one timeout, not after the batch ahead has used up its own first.
    """

    def __init__(
        self,
        write_many: Callable[[Outgoing[In]], Awaitable[None]],
        *,
        within: float | None = None,
        max_batch: int = 256,
        parallel: int = 1,
    ) -> None:
        # One batch in flight: the POSTs that arrive meanwhile all go in the next, bigger
        # one. Against two in flight, measured median +10 % POST/s (bench/notes.md). No
        # linger: a batch one loop pass late measured -5 % POST/s (bench/notes.md).
        super().__init__(max_batch=max_batch, parallel=parallel)
        self._write_many = write_many
        self._within = within
        self._untaken: set[Outgoing[In]] = set()  # batches waiting for their connection
        # One timer for the whole group, set for the earliest deadline still to come: on
        # the way of a row that goes in time, the deadline costs a clock read and a test.
        self._alarm: asyncio.TimerHandle | None = None

    async def add(self, row: In) -> None:
        if self._within is None:
            await self.call((row, math.inf))
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._within
        if self._alarm is None:  # else it is set for an earlier deadline, and moves on
            self._alarm = loop.call_at(deadline, self._expire)
        await self.call((row, deadline))

    def _expire(self) -> None:
        """Fail every row due that is not taken yet; set the alarm for the next one."""
        self._alarm = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        late = DependencyUnavailable("database", f"no connection within {self._within} s")
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

    async def run(self, batch: list[Waiting[In]]) -> None:
        wait: float | None = None
        if self._within is not None:
            wait = max(batch[-1][0][1] - asyncio.get_running_loop().time(), SOME_WAIT)
        outgoing = Outgoing(batch, wait)
        self._untaken.add(outgoing)
        try:
            await self._write_many(outgoing)
        except (psycopg.DataError, psycopg.IntegrityError) as error:
            if outgoing.taken is None or len(outgoing.taken) <= 1:
                raise
            log.debug("a batch of %d rows failed (%s): writing each alone", len(batch), error)
            await self._each_alone(outgoing.taken)
        else:
            assert outgoing.taken is not None, "write_many takes its rows"
            for _, future in outgoing.taken:
                settle(future)
        finally:
            self._untaken.discard(outgoing)

    async def _each_alone(self, taken: list[Waiting[In]]) -> None:
        """Write each row of a failed batch alone (they were taken: no deadline now)."""
        for index, one in enumerate(taken):
            try:
                await self._write_many(Outgoing([one]))
            except DependencyUnavailable as error:
                # The database went away: the rows left would each wait for it in turn.
                for _, future in taken[index:]:
                    settle(future, error=error)
                return
            except Exception as error:
                settle(one[1], error=error)
            else:
                settle(one[1])

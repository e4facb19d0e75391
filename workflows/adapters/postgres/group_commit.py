"""Concurrent writes share one statement, one round trip and one commit (GroupCommit)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg

from workflows.adapters.grouping import DeadlineGroup, Outgoing, Waiting, settle
from workflows.domain.errors import DependencyUnavailable

log = logging.getLogger(__name__)

In = TypeVar("In")


class GroupCommit(DeadlineGroup[In, None]):
    """Rows handed to `add` go to the database together; `add` returns once its row has
    committed.

    `write_many` must be atomic (one autocommit statement, say), and call the batch's
    `take()` once it has its connection, just before it writes the rows that gives. When
    it fails with a data or integrity error (which one row could cause), each row is
    written alone so that only the guilty one fails; any other error fails the whole
    batch. A caller cancelled before its row is taken is left out; after, its row may
    still commit (as a lone write would).

    With `within`, a row waits at most that many seconds from its `add` to be taken (see
    DeadlineGroup): then its caller gets DependencyUnavailable and nothing of it is stored.
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
        super().__init__(
            within=within, dependency="database", max_batch=max_batch, parallel=parallel
        )
        self._write_many = write_many

    async def add(self, row: In) -> None:
        await self.submit(row)

    async def run(self, batch: list[Waiting[In]]) -> None:
        with self._sending(batch) as outgoing:
            try:
                await self._write_many(outgoing)
            except (psycopg.DataError, psycopg.IntegrityError) as error:
                if outgoing.taken is None or len(outgoing.taken) <= 1:
                    raise
                log.debug("a batch of %d rows failed (%s): writing each alone", len(batch), error)
                await self._each_alone(outgoing.taken)
                return
        assert outgoing.taken is not None, "write_many takes its rows"
        for _, future in outgoing.taken:
            settle(future)

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

"""Concurrent reads and claims share one statement, one round trip (and a claim batch one
commit); concurrent writes, group_commit.py."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar
from uuid import UUID, uuid4

import attrs

from workflows.adapters.grouping import DeadlineGroup, Group, Outgoing, Waiting, settle
from workflows.adapters.postgres.database import (
    VERIFY_WITHIN,
    Connection,
    Pool,
    rows_left_by,
    transaction,
)
from workflows.application.ports import ClaimHandler
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.model import Workflow, WorkflowStatus

log = logging.getLogger(__name__)

In = TypeVar("In")

# A claimed row whose handler failed (or whose caller went away) goes back to how it was,
# before the commit: queued rows are INSERTED and not dead-lettered, so only updated_at
# needs its old value.
PUT_BACK = """
UPDATE workflows
SET status = 'inserted', updated_at = queued.at
FROM unnest(%b::uuid[], %b::timestamptz[]) AS queued (uuid, at)
WHERE workflows.uuid = queued.uuid
"""


class GroupRead(DeadlineGroup[UUID, "Workflow | None"]):
    """Reads by uuid that arrive together share one statement (`uuid = ANY(…)`): one round
    trip for many GETs instead of one each. A call goes at once when no batch is in flight,
    and otherwise in the next batch, whose statement starts after the call was made: a
    read still sees every write committed before it was asked for.

    `read_many` gets the batch's Outgoing: it waits `outgoing.wait` for its connection,
    then reads what `take()` gives. With `within`, a read waits at most that many seconds
    from its call to be taken (see DeadlineGroup), batches ahead included."""

    def __init__(
        self,
        read_many: Callable[[Outgoing[UUID]], Awaitable[dict[UUID, Workflow]]],
        *,
        within: float | None = None,
        max_batch: int = 256,
        parallel: int = 2,
    ) -> None:
        super().__init__(
            within=within, dependency="database", max_batch=max_batch, parallel=parallel
        )
        self._read_many = read_many

    async def run(self, batch: list[Waiting[UUID]]) -> None:
        with self._sending(batch) as outgoing:
            found = await self._read_many(outgoing)
        for (uuid, _), future in outgoing.taken or ():
            settle(future, found.get(uuid))


@attrs.frozen
class Claim:
    uuid: UUID | None
    """The workflow to claim; None for the oldest queued one no one else holds."""
    handle: ClaimHandler
    now: datetime
    among: tuple[UUID, ...] = ()
    """With no `uuid`: the candidates to take the oldest from (empty: the whole queue)."""


# How many of a claim's rows carry its token (they do only if it committed), and whether
# the server process that ran it still runs.
CLAIMED = """
SELECT (SELECT count(*) FROM workflows WHERE uuid = ANY(%s::uuid[]) AND claim_token = %s),
       EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s)
"""


class GroupClaim(Group[Claim, "Workflow | None"]):
    """Consumes in groups: one transaction locks a row for each claim of the batch (the
    oldest queued ones, or the named ones) and marks them CONSUMED in the same statement,
    runs every claim's handler, one after another, puts back the rows whose handler failed
    and commits: three round trips for the batch (BEGIN, the claim, COMMIT) when every handler
    succeeds.

    Each claim keeps the meaning of a lone one: it gets its row only after the commit; a
    handler that raises leaves its row queued as it was (and gets the error); a claim that
    finds no row gets None; a caller cancelled before the commit leaves its row queued, and
    `returned` is told how many such rows the batch put back, once it has committed.
    A batch's rows share one consumed time, the latest `now` of its claims, and one token
    (`claim_token`, random): when the connection dies with the COMMIT, the rows tell
    whether it committed, and the callers get their workflows rather than a 503.

    A batch goes one pass of the event loop after it could (`linger`): under load the
    consumes whose requests are read in that pass join it, about twice as many per
    transaction at 8 concurrent consumes (bench/notes.md, session 16). With `begin_first`
    (the consumes of both backends) a batch's runner sends `BEGIN` at once instead, and its
    batch is the claims that came by the time the answer is back: the requests read during
    that round trip join it, and the round trip overlaps their reading instead of following
    it (bench/notes.md, session 18). While such a `BEGIN` is on its way no other runner
    starts: it would find nothing to take. A `BEGIN` takes no snapshot and no lock.

    The handlers run in the batch's own task, not a task each: their work is CPU on the
    loop (a CSV and its file, flushed behind), so side by side they only interleaved with
    the loop's other work and the COMMIT went passes later; one handler that waits (a file
    written late, with its fsync) holds up the ones after it.
    """

    def __init__(
        self,
        pool: Pool,
        take_many: Callable[
            [Connection, list[Claim], datetime, UUID], Awaitable[list[Workflow | None]]
        ],
        *,
        max_batch: int = 32,
        parallel: int = 2,
        linger: int = 1,
        begin_first: bool = False,
        returned: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(max_batch=max_batch, parallel=parallel, linger=linger)
        self._pool = pool
        self._take_many = take_many
        self._begin_first = begin_first
        self._returned = returned
        self._beginning: set[object] = set()  # runners whose BEGIN is on its way

    def _collecting(self) -> bool:
        return bool(self._beginning)  # such a runner takes what is pending when BEGIN is done

    async def _drain_pending(self) -> None:
        if not self._begin_first:
            await super()._drain_pending()
            return
        while self._pending:
            runner = object()
            taken: list[tuple[Claim, asyncio.Future[Workflow | None]]] = []
            self._beginning.add(runner)
            try:
                await self._run(functools.partial(self._take, taken, runner))
            except Exception as error:  # every waiter gets it (503 for DependencyUnavailable)
                if runner in self._beginning:  # BEGIN failed: the batch fails with it
                    self._take(taken, runner)
                for _, future in taken:
                    settle(future, error=error)
            finally:
                self._beginning.discard(runner)

    def _take(
        self, into: list[tuple[Claim, asyncio.Future[Workflow | None]]], runner: object
    ) -> list[tuple[Claim, asyncio.Future[Workflow | None]]]:
        """The next batch of pending claims whose callers are still there, into `into`,
        once `runner`'s BEGIN is answered."""
        self._beginning.discard(runner)
        into.extend(item for item in self._pending[: self._max_batch] if not item[1].done())
        del self._pending[: self._max_batch]
        return into

    async def run(self, batch: list[tuple[Claim, asyncio.Future[Workflow | None]]]) -> None:
        await self._run(lambda: batch)

    async def _run(
        self, take: Callable[[], list[tuple[Claim, asyncio.Future[Workflow | None]]]]
    ) -> None:
        consumed: list[tuple[asyncio.Future[Workflow | None], Workflow]] = []
        failed: list[tuple[asyncio.Future[Workflow | None], BaseException]] = []
        mine: list[tuple[Claim, asyncio.Future[Workflow | None], Workflow]] = []
        batch: list[tuple[Claim, asyncio.Future[Workflow | None]]] = []
        ran_by, committing, token = 0, False, uuid4()
        gone = 0  # rows put back because their callers had left
        try:
            try:
                async with transaction(self._pool) as conn:
                    # With `begin_first`, the batch is the claims that came by the time
                    # BEGIN was answered: those read meanwhile join it.
                    batch = take()
                    if not batch:
                        return
                    now = max(claim.now for claim, _ in batch)
                    ran_by = conn.info.backend_pid
                    taken = await self._take_many(conn, [claim for claim, _ in batch], now, token)
                    mine = [
                        (claim, future, workflow)
                        for (claim, future), workflow in zip(batch, taken, strict=True)
                        if workflow is not None
                    ]
                    # One after another, in this task: a handler is CPU on the loop (the
                    # CSV and its file), and a task each would put the COMMIT passes of
                    # the loop later (bench/notes.md, session 17).
                    back: list[Workflow] = []
                    for claim, future, workflow in mine:
                        try:
                            await claim.handle(workflow)
                        except Exception as raised:
                            failed.append((future, raised))
                            back.append(workflow)
                            continue
                        if future.done():  # the caller has gone: its row stays queued
                            back.append(workflow)
                            gone += 1
                        else:
                            consumed.append(
                                (future, workflow.with_status(WorkflowStatus.CONSUMED, now))
                            )
                    if back:
                        columns = ([w.uuid for w in back], [w.updated_at for w in back])
                        await conn.execute(PUT_BACK, columns)
                    committing = True
            except DependencyUnavailable:
                # The connection died with the COMMIT: the server may have committed and
                # lost only its answer. Ask the rows, rather than answer 503 for workflows
                # that are consumed and whose files are written.
                uuids = [workflow.uuid for _, _, workflow in mine]
                if not committing or not uuids or not await self._committed(uuids, token, ran_by):
                    raise
                log.warning("a lost answer: the claim of %d workflows committed", len(uuids))
        finally:
            # Only now, with the transaction over and every lock released: a caller that
            # sees its handler's error may count the failure on that row at once.
            for future, error in failed:
                settle(future, error=error)
        for future, workflow in consumed:
            settle(future, workflow)
        for _, future in batch:
            settle(future, None)  # found no row (or, below the others, nothing left)
        if gone and self._returned is not None:
            # Queued again now that the COMMIT is done: a consume waiting for work (long
            # poll) takes them at once, not at its next look.
            self._returned(gone)

    async def _committed(self, uuids: list[UUID], token: UUID, ran_by: int) -> bool:
        """Whether the claim with `token` of these rows committed: some of them carry the
        token. Not once its server process (`ran_by`) is gone without them, or when the
        database cannot say within VERIFY_WITHIN seconds."""
        found = await rows_left_by(
            self._pool, CLAIMED, (uuids, token, ran_by), within=VERIFY_WITHIN
        )
        return bool(found)

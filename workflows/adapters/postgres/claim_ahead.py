"""Consumes served from rows claimed ahead of them, in shared transactions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from uuid import UUID, uuid4

from workflows.adapters.grouping import settle
from workflows.adapters.postgres.batching import PUT_BACK, claim_committed
from workflows.adapters.postgres.database import Connection, Pool, transaction
from workflows.application.ports import ClaimHandler
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.model import Workflow, WorkflowStatus

log = logging.getLogger(__name__)

TakeOldest = Callable[[Connection, int, datetime, UUID], Awaitable[list[Workflow]]]
Grant = tuple["_Hold", Workflow]
Waiter = asyncio.Future["Grant | None"]


class _Hold:
    """One claim transaction's rows: free ones for the consumes to come, and what became of
    the ones given out."""

    __slots__ = ("changed", "done", "failed", "free", "given", "returned")

    def __init__(self) -> None:
        self.free: list[Workflow] = []
        self.given = 0
        self.done: list[tuple[asyncio.Future[Workflow | None], Workflow]] = []
        self.failed: list[tuple[asyncio.Future[Workflow | None], BaseException, Workflow]] = []
        self.returned: list[Workflow] = []  # given to a consume that left before its handler
        self.changed = asyncio.Event()

    @property
    def outstanding(self) -> int:
        """Rows given out whose consume has not said how its handler went."""
        return self.given - len(self.done) - len(self.failed) - len(self.returned)

    def give(self) -> Workflow:
        self.given += 1
        return self.free.pop(0)


class ClaimAhead:
    """Consumes of the oldest queued rows, from rows claimed before the consumes that get
    them arrive.

    A runner claims rows in a transaction (the claim-and-mark statement of `GroupClaim`:
    locked with `SKIP LOCKED` and marked CONSUMED at once, uncommitted) and gives one to
    each consume as it comes; the consume writes its file in its own task and waits for
    the commit. The runner commits once every row given out is done and either none is
    left or `hold` seconds have passed since the rows came: rows nobody took, and rows
    whose handler failed or whose consume left, are put back as they were, in the same
    transaction. When every row of a transaction was taken, the runner claims as many
    again at once, before the consumes that will take them arrive: under load a consume
    then waits for its file and one COMMIT, not for BEGIN and the claim too.

    Each consume keeps the meaning of `GroupClaim`'s: it gets its row only after the
    commit; a handler that raises leaves its row queued as it was and gets the error once
    the transaction is over; a consume gets None only when a claim asked after it came
    found no row; one that leaves before the commit leaves its row queued; a lost COMMIT
    answer is settled by the rows' claim token. What claiming ahead changes: rows claimed
    ahead are locked by this process, so other processes' consumes skip them for up to
    `hold` seconds; and a transaction's rows share the consumed time of its claim, which
    for rows claimed ahead is the clock's time then, up to the claim's duration and
    `hold` before the request that gets one. `parallel` transactions at most are open.
    """

    def __init__(
        self,
        pool: Pool,
        take_oldest: TakeOldest,
        clock: Callable[[], datetime],
        *,
        hold: float = 0.002,
        max_batch: int = 32,
        parallel: int = 2,
    ) -> None:
        self._pool = pool
        self._take_oldest = take_oldest
        self._clock = clock
        self._hold = hold
        self._max_batch = max_batch
        self._parallel = parallel
        self._waiting: list[tuple[datetime, Waiter]] = []
        self._holds: list[_Hold] = []
        self._running = 0
        self._coming = 0  # rows asked for by the claims on their way
        self._starting = False
        self._runners: set[asyncio.Task[None]] = set()  # references, so none is collected

    async def call(self, handle: ClaimHandler, now: datetime) -> Workflow | None:
        for hold in self._holds:
            if hold.free:
                return await self._serve(hold, hold.give(), handle)
        granted: Waiter = asyncio.get_running_loop().create_future()
        self._waiting.append((now, granted))
        if (
            not self._starting
            and len(self._waiting) > self._coming
            and self._running < self._parallel
        ):
            self._running += 1
            self._starting = True  # and so claims for every consume waiting when it starts
            runner = asyncio.create_task(self._run(), name=type(self).__name__)
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        try:
            grant = await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                given = granted.result()
                if given is not None:  # a row came with the cancellation: it goes back
                    hold, workflow = given
                    hold.returned.append(workflow)
                    hold.changed.set()
            raise
        if grant is None:
            return None
        return await self._serve(*grant, handle)

    async def _serve(
        self, hold: _Hold, workflow: Workflow, handle: ClaimHandler
    ) -> Workflow | None:
        result: asyncio.Future[Workflow | None] = asyncio.get_running_loop().create_future()
        try:
            await handle(workflow)
        except Exception as error:
            hold.failed.append((result, error, workflow))
        except BaseException:
            hold.returned.append(workflow)
            raise
        else:
            hold.done.append((result, workflow))
        finally:
            hold.changed.set()
        return await result

    async def _run(self) -> None:
        try:
            self._starting = False
            want = 0
            while self._waiting or want:
                want = min(max(want, len(self._waiting), 1), self._max_batch)
                try:
                    served = await self._one(want)
                except Exception:  # every consume of that transaction has the error
                    served = 0
                want = want if served == want else 0  # all taken: claim as many ahead
        finally:
            self._running -= 1

    async def _one(self, want: int) -> int:
        """One claim transaction of up to `want` rows; how many rows it consumed."""
        asked = {granted for _, granted in self._waiting}
        now = max((at for at, _ in self._waiting), default=None) or self._clock()
        hold, token = _Hold(), uuid4()
        try:
            await self._claim(hold, want, now, token, asked)
        except Exception as error:
            for result, _ in hold.done:
                settle(result, error=error)
            self._waiting = [(at, g) for at, g in self._waiting if g not in asked]
            for granted in asked:
                settle(granted, error=error)
            raise
        finally:
            for result, raised, _ in hold.failed:  # its row is queued again: now it may know
                settle(result, error=raised)
        consumed = 0
        for result, workflow in hold.done:
            if not result.done():
                settle(result, workflow.with_status(WorkflowStatus.CONSUMED, now))
                consumed += 1
        return consumed

    async def _claim(
        self, hold: _Hold, want: int, now: datetime, token: UUID, asked: set[Waiter]
    ) -> None:
        ran_by, committing, claiming = 0, False, True
        self._coming += want
        try:
            async with transaction(self._pool) as conn:
                ran_by = conn.info.backend_pid
                hold.free = await self._take_oldest(conn, want, now, token)
                self._coming -= want
                claiming = False
                self._holds.append(hold)
                try:
                    self._give_out(hold, asked if len(hold.free) < want else set())
                    await self._until_settled(hold)
                finally:
                    self._holds.remove(hold)
                back = hold.free + hold.returned + [w for _, _, w in hold.failed]
                back += [workflow for result, workflow in hold.done if result.done()]
                if back:
                    columns = ([w.uuid for w in back], [w.updated_at for w in back])
                    await conn.execute(PUT_BACK, columns)
                committing = True
        except DependencyUnavailable:
            # As GroupClaim: the COMMIT's answer may be all that was lost.
            uuids = [w.uuid for result, w in hold.done if not result.done()]
            if (
                not committing
                or not uuids
                or not await claim_committed(self._pool, uuids, token, ran_by)
            ):
                raise
            log.warning("a lost answer: the claim of %d workflows committed", len(uuids))
        finally:
            if claiming:  # it failed before its rows came
                self._coming -= want

    def _give_out(self, hold: _Hold, asked: set[Waiter]) -> None:
        """Rows to the consumes waiting, first come first served. The claim found fewer
        rows than it asked for: those of `asked` (waiting before it began) that get none
        learn that nothing is left, unless another transaction has a row free."""
        while hold.free and self._waiting:
            _, granted = self._waiting.pop(0)
            if not granted.done():
                settle(granted, (hold, hold.give()))
        if hold.free or not asked or self._coming:
            return  # another claim of ours is on its way: it may bring rows this one skipped
        keep = []
        for at, granted in self._waiting:
            if granted.done():
                continue
            if granted not in asked:
                keep.append((at, granted))
                continue
            other = next((h for h in self._holds if h.free), None)
            settle(granted, None if other is None else (other, other.give()))
        self._waiting = keep

    async def _until_settled(self, hold: _Hold) -> None:
        """Until every row given out is done, and none is free or `hold` has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._hold
        timer = loop.call_at(deadline, hold.changed.set)
        try:
            while hold.outstanding or (hold.free and loop.time() < deadline):
                hold.changed.clear()
                await hold.changed.wait()
        finally:
            timer.cancel()

"""GroupCommit: concurrent rows share writes; a bad row fails alone; callers can leave; a
row waits for its connection at most its deadline, the batch ahead included."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from workflows.adapters.grouping import Outgoing
from workflows.adapters.postgres.group_commit import GroupCommit
from workflows.domain.errors import DependencyUnavailable


class Recorder:
    """A write_many that records each batch and takes a while, like a round trip. Its
    batch waits for `connected` (a free connection) up to the batch's wait, as the pool
    does, and then takes its rows; `gate` holds the write that has taken them."""

    def __init__(self, *, bad: frozenset[int] = frozenset(), down: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.bad = bad
        self.down = down
        self.calls = 0
        self.connected = asyncio.Event()
        self.connected.set()
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, outgoing: Outgoing[int]) -> None:
        self.calls += 1
        try:
            await asyncio.wait_for(self.connected.wait(), outgoing.wait)
        except TimeoutError:
            raise DependencyUnavailable("database", "no connection") from None
        rows = outgoing.take()
        if not rows:
            return
        await self.gate.wait()
        await asyncio.sleep(0.01)
        if self.down:
            raise DependencyUnavailable("database", "down")
        if self.bad & set(rows):
            raise psycopg.errors.UntranslatableCharacter("bad row")
        self.batches.append(list(rows))


async def test_a_lone_row_is_written_at_once_in_a_batch_of_its_own() -> None:
    writer = Recorder()
    group = GroupCommit(writer)
    await asyncio.wait_for(group.add(1), 1)
    assert writer.batches == [[1]]


async def test_rows_that_arrive_during_a_write_go_together_in_the_next() -> None:
    writer = Recorder()
    group = GroupCommit(writer, parallel=1)
    first = asyncio.create_task(group.add(0))
    await asyncio.sleep(0.005)  # the first row's write is under way
    await asyncio.gather(first, *(group.add(n) for n in range(1, 50)))
    assert writer.batches == [[0], list(range(1, 50))]


async def test_batches_are_capped_and_at_most_parallel_writes_are_in_flight() -> None:
    writer = Recorder()
    writer.gate.clear()
    group = GroupCommit(writer, max_batch=10, parallel=2)
    adds = [asyncio.create_task(group.add(n)) for n in range(35)]
    await asyncio.sleep(0)
    writer.gate.set()
    await asyncio.gather(*adds)
    assert all(len(batch) <= 10 for batch in writer.batches)
    assert sorted(n for batch in writer.batches for n in batch) == list(range(35))
    assert len(writer.batches) == 4


async def test_a_data_error_fails_only_the_row_that_caused_it() -> None:
    writer = Recorder(bad=frozenset({7}))
    group = GroupCommit(writer, parallel=1)
    results = await asyncio.gather(*(group.add(n) for n in range(20)), return_exceptions=True)
    failed = [n for n, result in enumerate(results) if isinstance(result, Exception)]
    assert failed == [7]
    assert isinstance(results[7], psycopg.DataError)
    assert sorted(n for batch in writer.batches for n in batch) == [n for n in range(20) if n != 7]


async def test_an_unavailable_database_fails_every_row_of_the_batch() -> None:
    writer = Recorder(down=True)
    group = GroupCommit(writer)
    results = await asyncio.gather(*(group.add(n) for n in range(5)), return_exceptions=True)
    assert all(isinstance(result, DependencyUnavailable) for result in results)


async def test_a_caller_cancelled_before_its_batch_goes_is_left_out() -> None:
    writer = Recorder()
    group = GroupCommit(writer)
    leaving = asyncio.create_task(group.add(1))
    staying = asyncio.create_task(group.add(2))
    await asyncio.sleep(0)  # both are queued; no batch has gone yet
    leaving.cancel()
    await staying
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert writer.batches == [[2]]


async def test_a_caller_cancelled_after_its_batch_went_does_not_stop_the_write() -> None:
    writer = Recorder()
    writer.gate.clear()
    group = GroupCommit(writer)
    leaving = asyncio.create_task(group.add(1))
    staying = asyncio.create_task(group.add(2))
    await asyncio.sleep(0.005)  # the batch [1, 2] is waiting at the gate
    leaving.cancel()
    writer.gate.set()
    await staying
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert writer.batches == [[1, 2]]


async def test_a_call_made_as_the_last_batch_finishes_still_goes() -> None:
    """The runner that has just found nothing more to do is not counted as running."""
    finishing = asyncio.Event()

    async def write_many(outgoing: Outgoing[int]) -> None:
        outgoing.take()
        await asyncio.sleep(0.001)
        finishing.set()  # wakes `late` before the runner's task is marked done

    group = GroupCommit(write_many, parallel=1)

    async def late() -> None:
        await finishing.wait()
        await group.add(2)

    latecomer = asyncio.create_task(late())
    await group.add(1)
    await asyncio.wait_for(latecomer, 1)


async def test_a_row_that_waits_its_deadline_behind_a_batch_fails_and_is_left_out() -> None:
    """The batch ahead waits for a connection that does not come: a row behind it gets its
    DependencyUnavailable (503) once its own deadline has passed, not after the batch
    ahead has failed and its own batch waited a whole timeout more; and when the
    connection does come, its batch writes only the rows whose callers still wait."""
    writer = Recorder()
    writer.connected.clear()
    group = GroupCommit(writer, within=1.0)
    loop = asyncio.get_running_loop()
    ahead = asyncio.create_task(group.add(0))
    await asyncio.sleep(0.3)
    started = loop.time()
    behind = asyncio.create_task(group.add(1))
    await asyncio.sleep(0.45)
    later = asyncio.create_task(group.add(2))  # due at 1.75 s; 1 is due at 1.3 s
    with pytest.raises(DependencyUnavailable):
        await ahead  # at 1.0 s
    with pytest.raises(DependencyUnavailable):
        await behind
    # Its own 1.0 s (0.35 s to spare), not 0.7 s behind the batch ahead + 1.0 s.
    assert loop.time() - started < 1.35
    writer.connected.set()  # at 1.3 s: in time for 2 only (0.45 s to spare)
    await asyncio.wait_for(later, 1)
    assert writer.batches == [[2]]


async def test_a_row_taken_by_its_write_is_not_failed_by_its_deadline() -> None:
    """Once its statement may have gone, only the write's outcome answers the caller."""
    writer = Recorder()
    writer.gate.clear()
    group = GroupCommit(writer, within=0.05)
    adding = asyncio.create_task(group.add(1))
    await asyncio.sleep(0.2)
    writer.gate.set()
    await asyncio.wait_for(adding, 1)
    assert writer.batches == [[1]]


async def test_rows_retried_alone_all_fail_at_once_when_the_database_goes_away() -> None:
    """A bad row makes its batch's rows go one by one; the database going away then fails
    the rest at once, instead of each waiting for a connection in turn."""
    writer = Recorder(bad=frozenset({2}))

    async def going_away_after_the_batch(outgoing: Outgoing[int]) -> None:
        writer.down = writer.calls >= 1
        await writer(outgoing)

    group = GroupCommit(going_away_after_the_batch, within=5)
    results = await asyncio.gather(*(group.add(n) for n in range(6)), return_exceptions=True)
    assert all(isinstance(result, DependencyUnavailable) for result in results)
    assert writer.calls == 2  # the batch, then the first row alone

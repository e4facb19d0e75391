"""GroupCommit: concurrent rows share writes; a bad row fails alone; callers can leave."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import psycopg
import pytest

from workflows.adapters.postgres.batching import GroupCommit
from workflows.domain.errors import DependencyUnavailable


class Recorder:
    """A write_many that records each batch and takes a while, like a round trip."""

    def __init__(self, *, bad: frozenset[int] = frozenset(), down: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.bad = bad
        self.down = down
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, rows: Sequence[int]) -> None:
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

    async def write_many(rows: Sequence[int]) -> None:
        await asyncio.sleep(0.001)
        finishing.set()  # wakes `late` before the runner's task is marked done

    group = GroupCommit(write_many, parallel=1)

    async def late() -> None:
        await finishing.wait()
        await group.add(2)

    latecomer = asyncio.create_task(late())
    await group.add(1)
    await asyncio.wait_for(latecomer, 1)

"""Consumes served from rows claimed ahead (ClaimAhead) keep the meaning of lone ones."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from workflows.adapters.postgres import PostgresDatabase, PostgresQueue, PostgresWorkflowRepository
from workflows.domain.ids import uuid7
from workflows.domain.model import JsonDocument, Workflow, WorkflowStatus

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
T1 = T0 + timedelta(minutes=1)  # the queue's clock: the time of rows claimed ahead
HOLD = 0.05


def make(n: int) -> Workflow:
    return Workflow.new(uuid7(), JsonDocument(f'{{"n":{n}}}'), (), T0)


async def queued(pg: PostgresDatabase, n: int) -> tuple[PostgresWorkflowRepository, list[Workflow]]:
    repository = PostgresWorkflowRepository(pg.pool, outbox=False)
    workflows = sorted((make(i) for i in range(n)), key=lambda w: w.uuid)
    for workflow in workflows:
        await repository.add(workflow)
    return repository, workflows


def ahead(pg: PostgresDatabase, hold: float = HOLD) -> PostgresQueue:
    return PostgresQueue(pg.pool, claim_ahead=hold, clock=lambda: T1)


async def stored(repository: PostgresWorkflowRepository, workflows: list[Workflow]) -> list[str]:
    found = [await repository.get(w.uuid) for w in workflows]
    return [w.status.value if w else "missing" for w in found]


async def nothing(workflow: Workflow) -> None:
    pass


async def test_concurrent_consumes_take_each_row_once_oldest_first(pg: PostgresDatabase) -> None:
    repository, workflows = await queued(pg, 20)
    queue = ahead(pg, hold=0.002)
    taken: list[Workflow] = []

    async def consumer() -> None:
        while (workflow := await queue.consume(nothing, T0)) is not None:
            taken.append(workflow)

    await asyncio.gather(*(consumer() for _ in range(6)))
    assert sorted(w.uuid for w in taken) == [w.uuid for w in workflows]
    assert set(await stored(repository, workflows)) == {"consumed"}


async def test_rows_claimed_ahead_that_no_consume_takes_go_back_as_they_were(
    pg: PostgresDatabase,
) -> None:
    repository, workflows = await queued(pg, 6)
    queue = ahead(pg)
    first = await asyncio.gather(*(queue.consume(nothing, T0) for _ in range(2)))
    assert sorted(w.uuid for w in first if w) == [w.uuid for w in workflows[:2]]
    # Every row of that claim was taken: two more are claimed ahead at once, and held.
    await asyncio.sleep(HOLD * 4)
    assert await stored(repository, workflows) == ["consumed"] * 2 + ["inserted"] * 4
    for workflow in workflows[2:]:
        assert await repository.get(workflow.uuid) == workflow  # exactly as it was


async def test_a_consume_that_comes_while_rows_are_held_gets_one_claimed_ahead(
    pg: PostgresDatabase,
) -> None:
    repository, workflows = await queued(pg, 3)
    queue = ahead(pg)
    first = await queue.consume(nothing, T0)
    assert first is not None
    assert first.updated_at == T0  # asked for: the time of the consume that asked
    second = await queue.consume(nothing, T0)
    assert second is not None
    assert second.uuid == workflows[1].uuid
    assert second.updated_at == T1  # claimed ahead, at the queue's clock's time
    stored_second = await repository.get(second.uuid)
    assert stored_second == second


async def test_other_queues_skip_rows_held_ahead_until_they_go_back(pg: PostgresDatabase) -> None:
    _, workflows = await queued(pg, 4)
    holder, other = ahead(pg, hold=0.5), PostgresQueue(pg.pool)
    assert (await holder.consume(nothing, T0)) is not None  # and claims one ahead: the 2nd
    await asyncio.sleep(0.05)
    taken = await other.consume(nothing, T0)
    assert taken is not None
    assert taken.uuid == workflows[2].uuid, "the second is held ahead by the other process"
    await asyncio.sleep(0.6)
    again = await other.consume(nothing, T0)
    assert again is not None
    assert again.uuid == workflows[1].uuid, "given back unused: queued again, oldest first"


async def test_a_failing_handler_leaves_only_its_own_row_queued(pg: PostgresDatabase) -> None:
    repository, workflows = await queued(pg, 6)
    queue = ahead(pg, hold=0.002)
    bad = workflows[2].uuid

    async def handle(workflow: Workflow) -> None:
        await asyncio.sleep(0.001)
        if workflow.uuid == bad:
            raise RuntimeError("export failed")

    results = await asyncio.gather(
        *(queue.consume(handle, T0) for _ in range(5)), return_exceptions=True
    )
    assert sum(isinstance(r, RuntimeError) for r in results) == 1
    await asyncio.sleep(0.05)  # the row claimed ahead goes back
    assert await stored(repository, workflows) == (
        ["consumed"] * 2 + ["inserted"] + ["consumed"] * 2 + ["inserted"]
    )
    assert await repository.get(bad) == workflows[2]  # put back exactly as it was


async def test_the_error_of_a_failed_handler_comes_once_its_row_is_queued_again(
    pg: PostgresDatabase,
) -> None:
    repository, workflows = await queued(pg, 1)
    queue = ahead(pg)

    async def handle(workflow: Workflow) -> None:
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        await queue.consume(handle, T0)
    # at once, as a caller counting the failure on the row would look
    assert await stored(repository, workflows) == ["inserted"]
    assert await repository.get(workflows[0].uuid) == workflows[0]


async def test_a_consume_that_leaves_during_its_handler_leaves_its_row_queued(
    pg: PostgresDatabase,
) -> None:
    repository, workflows = await queued(pg, 1)
    queue = ahead(pg)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(workflow: Workflow) -> None:
        started.set()
        await release.wait()

    leaving = asyncio.create_task(queue.consume(slow, T0))
    await started.wait()
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await asyncio.sleep(HOLD * 2)
    assert await repository.get(workflows[0].uuid) == workflows[0]
    again = await queue.consume(nothing, T0)
    assert again is not None
    assert again.uuid == workflows[0].uuid
    assert again.status is WorkflowStatus.CONSUMED


async def test_a_consume_that_leaves_after_its_handler_leaves_its_row_queued(
    pg: PostgresDatabase,
) -> None:
    """Its file is written, but it is gone before the commit: the row is put back."""
    repository, workflows = await queued(pg, 2)
    queue = ahead(pg, hold=0.2)
    first = await queue.consume(nothing, T0)  # the second row is now held ahead
    assert first is not None
    handled = asyncio.Event()

    async def handle(workflow: Workflow) -> None:
        handled.set()

    leaving = asyncio.create_task(queue.consume(handle, T0))
    await handled.wait()
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await asyncio.sleep(0.4)
    assert await stored(repository, workflows) == ["consumed", "inserted"]
    assert await repository.get(workflows[1].uuid) == workflows[1]


async def test_consumes_cancelled_while_waiting_lose_no_row(pg: PostgresDatabase) -> None:
    repository, workflows = await queued(pg, 10)
    queue = ahead(pg, hold=0.002)
    tasks = [asyncio.create_task(queue.consume(nothing, T0)) for _ in range(10)]
    await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    done = [r for r in results if isinstance(r, Workflow)]
    await asyncio.sleep(0.05)
    statuses = await stored(repository, workflows)
    assert statuses.count("consumed") == len(done)
    assert statuses.count("inserted") == 10 - len(done)
    rest: list[Workflow] = []
    while (workflow := await queue.consume(nothing, T0)) is not None:
        rest.append(workflow)
    assert sorted(w.uuid for w in done + rest) == [w.uuid for w in workflows]


async def test_a_consume_gets_none_only_when_nothing_is_left(pg: PostgresDatabase) -> None:
    _, workflows = await queued(pg, 3)
    queue = ahead(pg, hold=0.002)
    results = await asyncio.gather(*(queue.consume(nothing, T0) for _ in range(5)))
    assert sorted(r.uuid for r in results if r is not None) == [w.uuid for w in workflows]
    assert results.count(None) == 2
    assert await queue.consume(nothing, T0) is None


async def test_more_consumes_than_one_claim_takes_all_get_rows(pg: PostgresDatabase) -> None:
    """A claim takes at most `max_batch` rows: the consumes beyond wait for the next one,
    rather than hear that nothing is left."""
    _, workflows = await queued(pg, 40)
    queue = ahead(pg, hold=0.002)
    results = await asyncio.gather(*(queue.consume(nothing, T0) for _ in range(40)))
    assert None not in results
    assert sorted(r.uuid for r in results if r is not None) == [w.uuid for w in workflows]

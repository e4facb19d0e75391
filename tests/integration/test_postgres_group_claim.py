"""Consumes grouped into shared transactions (GroupClaim) keep the meaning of lone ones."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from workflows.adapters.csv_export import CsvExporter
from workflows.adapters.postgres import PostgresDatabase, PostgresQueue, PostgresWorkflowRepository
from workflows.application.doorbell import Doorbell
from workflows.application.use_cases import ConsumeWorkflow
from workflows.domain.ids import uuid7
from workflows.domain.model import JsonDocument, Workflow, WorkflowStatus

pytestmark = pytest.mark.postgres

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def make(n: int) -> Workflow:
    return Workflow.new(uuid7(), JsonDocument(f'{{"n":{n}}}'), (), T0)


async def stored(repository: PostgresWorkflowRepository, workflows: list[Workflow]) -> list[str]:
    found = [await repository.get(w.uuid) for w in workflows]
    return [w.status.value if w else "missing" for w in found]


async def test_concurrent_consumes_share_transactions_and_take_each_row_once(
    pg: PostgresDatabase,
) -> None:
    repository, queue = PostgresWorkflowRepository(pg.pool, outbox=False), PostgresQueue(pg.pool)
    workflows = [make(n) for n in range(60)]
    for workflow in workflows:
        await repository.add(workflow)
    seen: list[Workflow] = []

    async def handle(workflow: Workflow) -> None:
        seen.append(workflow)
        await asyncio.sleep(0.001)

    results = await asyncio.gather(*(queue.consume(handle, T0) for _ in range(80)))
    taken = [w.uuid for w in results if w is not None]
    assert sorted(taken) == sorted(w.uuid for w in workflows)  # each once, none left out
    assert sum(result is None for result in results) == 20
    assert sorted(w.uuid for w in seen) == sorted(taken)
    transactions = await claim_transactions(pg, workflows)
    assert transactions < 20, f"{transactions} transactions took the 60 rows"
    assert set(await stored(repository, workflows)) == {"consumed"}


async def claim_transactions(pg: PostgresDatabase, workflows: list[Workflow]) -> int:
    """How many claim transactions took these rows: each marks its rows with its token."""
    async with pg.pool.connection() as conn:
        cursor = await conn.execute(
            "SELECT count(DISTINCT claim_token) FROM workflows WHERE uuid = ANY(%s)",
            ([w.uuid for w in workflows],),
        )
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def test_consumes_that_come_while_a_begin_is_on_its_way_join_its_transaction(
    pg: PostgresDatabase,
) -> None:
    """The postgres queue's batch goes to the database at once (BEGIN) and takes the
    consumes that came meanwhile: under load the requests read during that round trip
    share its transaction, and none waits for a later one."""
    repository, queue = PostgresWorkflowRepository(pg.pool, outbox=False), PostgresQueue(pg.pool)
    workflows = [make(n) for n in range(6)]
    for workflow in workflows:
        await repository.add(workflow)
    first = asyncio.create_task(queue.consume(handle_nothing, T0))
    for _ in range(2):  # the consume calls the group; its runner starts and sends BEGIN
        await asyncio.sleep(0)
    assert queue._claims._collecting(), "the first consume's BEGIN is on its way"
    rest = [asyncio.create_task(queue.consume(handle_nothing, T0)) for _ in range(5)]
    results = await asyncio.gather(first, *rest)
    assert sorted(w.uuid for w in results if w) == sorted(w.uuid for w in workflows)
    assert await claim_transactions(pg, workflows) == 1
    assert await queue.consume(handle_nothing, T0) is None


async def handle_nothing(workflow: Workflow) -> None:
    pass


async def test_a_failing_handler_leaves_only_its_own_row_queued(pg: PostgresDatabase) -> None:
    repository, queue = PostgresWorkflowRepository(pg.pool, outbox=False), PostgresQueue(pg.pool)
    workflows = [make(n) for n in range(6)]
    for workflow in workflows:
        await repository.add(workflow)
    bad = workflows[2].uuid

    async def handle(workflow: Workflow) -> None:
        await asyncio.sleep(0.001)
        if workflow.uuid == bad:
            raise RuntimeError("export failed")

    results = await asyncio.gather(
        *(queue.consume(handle, T0) for _ in range(6)), return_exceptions=True
    )
    assert sum(isinstance(r, RuntimeError) for r in results) == 1
    assert sorted(r.uuid for r in results if isinstance(r, Workflow)) == sorted(
        w.uuid for w in workflows if w.uuid != bad
    )
    assert await stored(repository, workflows) == ["consumed"] * 2 + ["inserted"] + ["consumed"] * 3
    assert await repository.get(bad) == workflows[2]  # put back exactly as it was

    async def fine(w: Workflow) -> None:
        pass

    again = await queue.consume(fine, T0)
    assert again is not None
    assert again.uuid == bad


async def test_the_handlers_of_a_batch_run_one_after_another(pg: PostgresDatabase) -> None:
    """In the batch's own task: a handler that waits holds up the next, none overlap."""
    repository, queue = PostgresWorkflowRepository(pg.pool, outbox=False), PostgresQueue(pg.pool)
    workflows = [make(n) for n in range(5)]
    for workflow in workflows:
        await repository.add(workflow)
    running, most, order = 0, 0, []

    async def handle(workflow: Workflow) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.005)
        order.append(workflow.uuid)
        running -= 1

    results = await asyncio.gather(*(queue.consume(handle, T0) for _ in range(5)))
    assert sorted(r.uuid for r in results if r is not None) == sorted(w.uuid for w in workflows)
    assert most == 1
    assert order == sorted(order)  # in the order the claim returned them: uuid order
    assert set(await stored(repository, workflows)) == {"consumed"}


async def test_claims_of_one_uuid_in_one_batch_give_it_to_one_claimant(
    pg: PostgresDatabase,
) -> None:
    repository = PostgresWorkflowRepository(pg.pool, outbox=True)
    workflow = make(1)
    await repository.add(workflow)
    handled: list[Workflow] = []

    async def handle(w: Workflow) -> None:
        handled.append(w)

    results = await asyncio.gather(*(repository.claim(workflow.uuid, handle, T0) for _ in range(5)))
    assert [r.uuid for r in results if r is not None] == [workflow.uuid]
    assert len(handled) == 1
    assert await stored(repository, [workflow]) == ["consumed"]


async def test_a_caller_that_leaves_during_its_handler_leaves_its_row_queued(
    pg: PostgresDatabase,
) -> None:
    repository, queue = PostgresWorkflowRepository(pg.pool, outbox=False), PostgresQueue(pg.pool)
    workflow = make(1)
    await repository.add(workflow)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(w: Workflow) -> None:
        started.set()
        await release.wait()

    leaving = asyncio.create_task(queue.consume(slow, T0))
    await started.wait()
    leaving.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    await asyncio.sleep(0.05)  # the batch finishes on its own
    assert await repository.get(workflow.uuid) == workflow  # put back exactly as it was
    again = await queue.consume(slow, T0)
    assert again is not None
    assert again.uuid == workflow.uuid
    assert again.status is WorkflowStatus.CONSUMED


async def test_a_row_put_back_for_a_caller_that_left_wakes_a_waiting_consume(
    pg: PostgresDatabase, tmp_path: Path
) -> None:
    """A long-poll consume takes a row queued again because its caller left, when the
    batch commits, not at its next look (here never: no recheck)."""
    doorbell = Doorbell()
    repository = PostgresWorkflowRepository(pg.pool, outbox=False)
    queue = PostgresQueue(pg.pool, returned=doorbell.ring)
    consume = ConsumeWorkflow(queue, CsvExporter(str(tmp_path)), lambda: T0, doorbell)
    consume.recheck_every = 3600.0
    waiting = asyncio.create_task(consume(wait=20))
    await asyncio.sleep(0.1)  # it looked, found nothing, and waits for the doorbell
    workflow = make(1)
    await repository.add(workflow)  # no ring: only the caller that leaves can wake it
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(w: Workflow) -> None:
        started.set()
        await release.wait()

    leaving = asyncio.create_task(queue.consume(slow, T0))
    await started.wait()
    leaving.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    consumed = await asyncio.wait_for(waiting, 5)
    assert consumed is not None
    assert consumed.workflow.uuid == workflow.uuid
    doorbell.close()


async def test_a_claim_by_uuid_whose_caller_left_tells_how_many_rows_went_back(
    pg: PostgresDatabase,
) -> None:
    """The rabbitmq backend's claims (by the message's uuid) tell of rows put back too."""
    returned: list[int] = []
    repository = PostgresWorkflowRepository(pg.pool, outbox=False, returned=returned.append)
    workflow = make(1)
    await repository.add(workflow)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(w: Workflow) -> None:
        started.set()
        await release.wait()

    leaving = asyncio.create_task(repository.claim(workflow.uuid, slow, T0))
    await started.wait()
    leaving.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    for _ in range(100):
        if returned:
            break
        await asyncio.sleep(0.01)
    assert returned == [1]
    assert await repository.get(workflow.uuid) == workflow  # queued, as it was


async def test_a_batch_answers_each_claim_with_the_row_as_committed(pg: PostgresDatabase) -> None:
    """The rows of a batch share one consumed time, the latest `now` of its claims; each
    caller gets its workflow as the database holds it, and its handler got it as queued."""
    repository, queue = PostgresWorkflowRepository(pg.pool, outbox=False), PostgresQueue(pg.pool)
    workflows = [make(n) for n in range(4)]
    for workflow in workflows:
        await repository.add(workflow)
    handled: dict[object, Workflow] = {}

    async def handle(w: Workflow) -> None:
        handled[w.uuid] = w
        await asyncio.sleep(0.001)

    nows = [T0 + timedelta(seconds=n) for n in range(4)]
    results = await asyncio.gather(*(queue.consume(handle, now) for now in nows))
    assert all(r is not None for r in results)
    for result in results:
        assert result is not None
        assert result == await repository.get(result.uuid)
        assert result.status is WorkflowStatus.CONSUMED
        assert T0 < result.updated_at <= nows[-1]
        assert handled[result.uuid] == next(w for w in workflows if w.uuid == result.uuid)

"""What every WorkflowQueue must do; run against memory, PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from tests.contract.conftest import QueueSetup
from workflows.application.ports import ClaimerGone
from workflows.domain.model import Workflow, WorkflowStatus


def now() -> datetime:
    return datetime.now(UTC)


class Recorder:
    def __init__(self) -> None:
        self.seen: list[Workflow] = []

    async def __call__(self, workflow: Workflow) -> None:
        self.seen.append(workflow)


async def test_consume_returns_none_when_queue_is_empty(queue_setup: QueueSetup) -> None:
    recorder = Recorder()
    assert await queue_setup.queue.consume(recorder, now()) is None
    assert recorder.seen == []


async def test_consume_takes_oldest_first_each_exactly_once(queue_setup: QueueSetup) -> None:
    submitted = [await queue_setup.submit() for _ in range(3)]
    recorder = Recorder()
    consumed = [await queue_setup.queue.consume(recorder, now()) for _ in range(3)]
    assert [w.uuid for w in consumed if w] == [w.uuid for w in submitted]
    assert all(w is not None and w.status is WorkflowStatus.CONSUMED for w in consumed)
    assert [w.uuid for w in recorder.seen] == [w.uuid for w in submitted]
    assert await queue_setup.queue.consume(recorder, now()) is None


async def test_one_consume_takes_one_workflow_and_leaves_the_rest(
    queue_setup: QueueSetup,
) -> None:
    first, second, third = [await queue_setup.submit() for _ in range(3)]
    claimed = await queue_setup.queue.consume(Recorder(), now())
    assert claimed is not None
    assert claimed.uuid == first.uuid
    for workflow in (second, third):
        stored = await queue_setup.repository.get(workflow.uuid)
        assert stored is not None
        assert stored.status is WorkflowStatus.INSERTED
    rest = [await queue_setup.queue.consume(Recorder(), now()) for _ in range(2)]
    assert [w.uuid for w in rest if w] == [second.uuid, third.uuid]


async def test_failed_handler_leaves_workflow_queued(queue_setup: QueueSetup) -> None:
    workflow = await queue_setup.submit()

    async def failing(w: Workflow) -> None:
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        await queue_setup.queue.consume(failing, now())
    stored = await queue_setup.repository.get(workflow.uuid)
    assert stored is not None
    assert stored.status is WorkflowStatus.INSERTED
    claimed = await queue_setup.queue.consume(Recorder(), now())
    assert claimed is not None
    assert claimed.uuid == workflow.uuid


async def test_workflow_patched_to_consumed_is_skipped(queue_setup: QueueSetup) -> None:
    taken_out, kept = await queue_setup.submit(), await queue_setup.submit()
    await queue_setup.repository.set_status(taken_out.uuid, WorkflowStatus.CONSUMED, now())
    recorder = Recorder()
    claimed = await queue_setup.queue.consume(recorder, now())
    assert claimed is not None
    assert claimed.uuid == kept.uuid
    assert [w.uuid for w in recorder.seen] == [kept.uuid]
    assert await queue_setup.queue.consume(recorder, now()) is None


async def test_replayed_workflow_is_consumed_again(queue_setup: QueueSetup) -> None:
    workflow = await queue_setup.submit()
    assert await queue_setup.queue.consume(Recorder(), now()) is not None
    change = await queue_setup.repository.set_status(workflow.uuid, WorkflowStatus.INSERTED, now())
    assert change is not None
    assert change.changed
    await queue_setup.queue.enqueued(change.workflow)
    again = await queue_setup.queue.consume(Recorder(), now())
    assert again is not None
    assert again.uuid == workflow.uuid
    assert await queue_setup.queue.consume(Recorder(), now()) is None


async def test_concurrent_consumers_take_each_workflow_exactly_once(
    queue_setup: QueueSetup,
) -> None:
    submitted = {(await queue_setup.submit()).uuid for _ in range(60)}
    recorder = Recorder()

    async def worker() -> list[Workflow]:
        taken = []
        while (workflow := await queue_setup.queue.consume(recorder, now())) is not None:
            taken.append(workflow)
        return taken

    results = await asyncio.gather(*(worker() for _ in range(8)))
    taken = [w.uuid for batch in results for w in batch]
    assert sorted(taken) == sorted(submitted)
    assert len(recorder.seen) == len(submitted)


async def test_ping_succeeds_when_queue_is_up(queue_setup: QueueSetup) -> None:
    await queue_setup.queue.ping()


async def test_a_handler_whose_caller_left_leaves_the_workflow_queued_uncounted(
    queue_setup: QueueSetup,
) -> None:
    """ClaimerGone is no failure of the workflow's: raised more often than a broker's
    delivery limit, it dead-letters nothing."""
    workflow = await queue_setup.submit()

    async def gone(w: Workflow) -> None:
        raise ClaimerGone

    for _ in range(12):
        with pytest.raises(ClaimerGone):
            await queue_setup.queue.consume(gone, now())
    sweep = getattr(queue_setup.queue, "sweep_dead_letters", None)
    if sweep is not None:
        assert await sweep(now()) == 0  # the broker dead-lettered no message of it
    stored = await queue_setup.repository.get(workflow.uuid)
    assert stored is not None
    assert (stored.status, stored.delivery_attempts) == (WorkflowStatus.INSERTED, 0)
    assert stored.dead_lettered_at is None
    claimed = await queue_setup.queue.consume(Recorder(), now())
    assert claimed is not None
    assert claimed.uuid == workflow.uuid


async def test_dead_lettered_workflow_is_skipped(queue_setup: QueueSetup) -> None:
    dead, alive = await queue_setup.submit(), await queue_setup.submit()
    await queue_setup.repository.record_failure(dead.uuid, now(), max_attempts=1)
    recorder = Recorder()
    claimed = await queue_setup.queue.consume(recorder, now())
    assert claimed is not None
    assert claimed.uuid == alive.uuid
    assert [w.uuid for w in recorder.seen] == [alive.uuid]
    assert await queue_setup.queue.consume(recorder, now()) is None


async def test_revived_dead_letter_is_consumed_again(queue_setup: QueueSetup) -> None:
    workflow = await queue_setup.submit()
    await queue_setup.repository.record_failure(workflow.uuid, now(), max_attempts=1)
    assert await queue_setup.queue.consume(Recorder(), now()) is None
    change = await queue_setup.repository.set_status(workflow.uuid, WorkflowStatus.INSERTED, now())
    assert change is not None
    await queue_setup.queue.enqueued(change.workflow)
    claimed = await queue_setup.queue.consume(Recorder(), now())
    assert claimed is not None
    assert claimed.uuid == workflow.uuid

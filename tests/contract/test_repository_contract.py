"""What every WorkflowRepository must do; run against the fake and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from workflows.application.ports import WorkflowRepository
from workflows.domain.errors import IdempotencyKeyReused
from workflows.domain.ids import uuid7
from workflows.domain.model import (
    IdempotencyKey,
    JsonDocument,
    Workflow,
    WorkflowStatus,
    steps_size,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def make(data: str = '{"a":1}', steps: tuple[str, ...] = ("s",)) -> Workflow:
    return Workflow.new(uuid7(), JsonDocument(data), steps, T0)


async def test_added_workflow_reads_back_identically(repository: WorkflowRepository) -> None:
    workflow = make('{"z":1,"a":{"y":[1,2.50,null]},"big":123456789012345678901234567890}')
    await repository.add(workflow)
    assert await repository.get(workflow.uuid) == workflow


async def test_data_keeps_key_order_exact_numbers_and_unicode(
    repository: WorkflowRepository,
) -> None:
    text = '{"b":1e400,"a":0.10000000000000000000001,"é":"\\"☃\\" \\n","n":-0,"t":true}'
    workflow = make(text)
    await repository.add(workflow)
    stored = await repository.get(workflow.uuid)
    assert stored is not None
    assert stored.data.text == text


async def test_get_unknown_uuid_returns_none(repository: WorkflowRepository) -> None:
    assert await repository.get(uuid7()) is None


async def test_list_is_oldest_first_with_status_filter_cursor_and_limit(
    repository: WorkflowRepository,
) -> None:
    workflows = [make() for _ in range(5)]
    for workflow in reversed(workflows):
        await repository.add(workflow)
    await repository.set_status(workflows[1].uuid, WorkflowStatus.CONSUMED, T0)

    everything = await repository.list(status=None, after=None, limit=100)
    assert [w.uuid for w in everything] == [w.uuid for w in workflows]

    page = await repository.list(status=None, after=workflows[1].uuid, limit=2)
    assert [w.uuid for w in page] == [workflows[2].uuid, workflows[3].uuid]

    inserted = await repository.list(status=WorkflowStatus.INSERTED, after=None, limit=100)
    assert [w.uuid for w in inserted] == [w.uuid for i, w in enumerate(workflows) if i != 1]
    consumed = await repository.list(status=WorkflowStatus.CONSUMED, after=None, limit=100)
    assert [w.uuid for w in consumed] == [workflows[1].uuid]


def sized(size: int, text: str = "") -> Workflow:
    """A workflow whose data is `size` UTF-8 bytes long (`text` in front, padding after)."""
    head = f'{{"t":"{text}","p":"'
    padding = size - len((head + '"}').encode())
    return make(head + "x" * padding + '"}', steps=())  # steps count too: none here


async def test_list_with_max_bytes_ends_at_the_first_workflow_past_them(
    repository: WorkflowRepository,
) -> None:
    # Sizes 100, 300, 50, 200, 100: the running totals before each are 0, 100, 400, 450, 650.
    workflows = [sized(100), sized(300, "é☃"), sized(50), sized(200, "€"), sized(100)]
    for workflow in workflows:
        await repository.add(workflow)
    assert [w.data.size for w in workflows] == [100, 300, 50, 200, 100]

    async def listed(limit: int, max_bytes: int | None, after: int | None = None) -> list[int]:
        start = None if after is None else workflows[after].uuid
        found = await repository.list(status=None, after=start, limit=limit, max_bytes=max_bytes)
        return [workflows.index(w) for w in found]

    # Ends at the first whose predecessors hold max_bytes or more, which it includes.
    assert await listed(10, 400) == [0, 1, 2]
    assert await listed(10, 401) == [0, 1, 2, 3]
    assert await listed(10, 100) == [0, 1]
    assert await listed(10, 99) == [0, 1]
    assert await listed(10, 1) == [0, 1]
    assert await listed(10, 650) == [0, 1, 2, 3, 4]
    assert await listed(10, 651) == [0, 1, 2, 3, 4]
    assert await listed(10, None) == [0, 1, 2, 3, 4]
    # The limit still holds, and the totals start after the cursor.
    assert await listed(2, 10_000) == [0, 1]
    assert await listed(10, 250, after=1) == [2, 3, 4]
    assert await listed(10, 249, after=1) == [2, 3, 4]
    assert await listed(10, 50, after=1) == [2, 3]
    assert await listed(10, 400, after=4) == []


async def test_list_with_max_bytes_counts_only_the_listed_workflows(
    repository: WorkflowRepository,
) -> None:
    workflows = [sized(1000), sized(100), sized(100), sized(1000), sized(100)]
    for workflow in workflows:
        await repository.add(workflow)
    for index in (0, 3):  # the large ones are not in the list of inserted workflows
        await repository.set_status(workflows[index].uuid, WorkflowStatus.CONSUMED, T0)

    found = await repository.list(
        status=WorkflowStatus.INSERTED, after=None, limit=10, max_bytes=200
    )
    assert [w.uuid for w in found] == [workflows[1].uuid, workflows[2].uuid, workflows[4].uuid]


async def test_set_status_of_unknown_uuid_returns_none(repository: WorkflowRepository) -> None:
    assert await repository.set_status(uuid7(), WorkflowStatus.CONSUMED, T0) is None


async def test_set_status_changes_status_and_updated_at(repository: WorkflowRepository) -> None:
    workflow = make()
    await repository.add(workflow)
    later = T0 + timedelta(seconds=5)
    change = await repository.set_status(workflow.uuid, WorkflowStatus.CONSUMED, later)
    assert change is not None
    assert change.changed
    assert change.workflow == workflow.with_status(WorkflowStatus.CONSUMED, later)
    assert await repository.get(workflow.uuid) == change.workflow


async def test_set_status_to_current_status_changes_nothing(
    repository: WorkflowRepository,
) -> None:
    workflow = make()
    await repository.add(workflow)
    change = await repository.set_status(
        workflow.uuid, WorkflowStatus.INSERTED, T0 + timedelta(seconds=5)
    )
    assert change is not None
    assert not change.changed
    assert change.workflow == workflow
    assert await repository.get(workflow.uuid) == workflow


async def test_claim_runs_handler_once_then_marks_consumed(repository: WorkflowRepository) -> None:
    workflow = make()
    await repository.add(workflow)
    seen: list[Workflow] = []

    async def handle(w: Workflow) -> None:
        seen.append(w)

    later = T0 + timedelta(seconds=1)
    claimed = await repository.claim(workflow.uuid, handle, later)
    assert seen == [workflow]
    assert claimed == workflow.with_status(WorkflowStatus.CONSUMED, later)
    assert await repository.get(workflow.uuid) == claimed
    assert await repository.claim(workflow.uuid, handle, later) is None
    assert len(seen) == 1


async def test_claim_of_unknown_uuid_returns_none_without_calling_handler(
    repository: WorkflowRepository,
) -> None:
    async def handle(w: Workflow) -> None:
        raise AssertionError("must not be called")

    assert await repository.claim(uuid7(), handle, T0) is None


async def test_claims_keep_workflow_inserted_when_handler_fails(
    repository: WorkflowRepository,
) -> None:
    workflow = make()
    await repository.add(workflow)

    async def handle(w: Workflow) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        await repository.claim(workflow.uuid, handle, T0)
    assert await repository.get(workflow.uuid) == workflow


async def test_concurrent_claims_of_one_workflow_succeed_exactly_once(
    repository: WorkflowRepository,
) -> None:
    workflow = make()
    await repository.add(workflow)
    calls = 0

    async def handle(w: Workflow) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)

    results = await asyncio.gather(*(repository.claim(workflow.uuid, handle, T0) for _ in range(8)))
    assert calls == 1
    assert sum(result is not None for result in results) == 1


async def test_ping_succeeds_when_store_is_up(repository: WorkflowRepository) -> None:
    await repository.ping()


def keyed(key: str, workflow: Workflow, ttl: timedelta = timedelta(hours=1)) -> IdempotencyKey:
    fingerprint = IdempotencyKey.fingerprint_of(workflow.data, workflow.steps)
    return IdempotencyKey(key, fingerprint, workflow.created_at + ttl)


async def test_same_idempotency_key_and_request_returns_the_first_workflow(
    repository: WorkflowRepository,
) -> None:
    first, second = make('{"a":1}'), make('{"a":1}')
    assert await repository.add(first, keyed("k-1", first)) == first
    assert await repository.add(second, keyed("k-1", second)) == first
    assert await repository.get(second.uuid) is None
    assert [w.uuid for w in await repository.list(status=None, after=None, limit=10)] == [
        first.uuid
    ]


async def test_same_idempotency_key_with_another_request_is_refused(
    repository: WorkflowRepository,
) -> None:
    first, other = make('{"a":1}'), make('{"a":2}')
    await repository.add(first, keyed("k-2", first))
    with pytest.raises(IdempotencyKeyReused):
        await repository.add(other, keyed("k-2", other))
    assert await repository.get(other.uuid) is None


async def test_expired_idempotency_key_names_a_new_request(repository: WorkflowRepository) -> None:
    first = make('{"a":1}')
    await repository.add(first, keyed("k-3", first, ttl=timedelta(seconds=1)))
    later = Workflow.new(uuid7(), JsonDocument('{"a":2}'), (), T0 + timedelta(seconds=2))
    assert await repository.add(later, keyed("k-3", later)) == later
    assert await repository.get(first.uuid) == first


async def test_concurrent_adds_with_one_key_store_one_workflow(
    repository: WorkflowRepository,
) -> None:
    candidates = [make('{"a":1}') for _ in range(6)]
    stored = await asyncio.gather(*(repository.add(w, keyed("k-4", w)) for w in candidates))
    assert len({w.uuid for w in stored}) == 1
    assert len(await repository.list(status=None, after=None, limit=10)) == 1


async def test_purge_forgets_only_expired_keys(repository: WorkflowRepository) -> None:
    short, long = make('{"a":1}'), make('{"a":2}')
    await repository.add(short, keyed("short", short, ttl=timedelta(seconds=1)))
    await repository.add(long, keyed("long", long, ttl=timedelta(hours=1)))
    assert await repository.purge_expired_keys(T0 + timedelta(seconds=5)) == 1
    other = make('{"a":3}')
    with pytest.raises(IdempotencyKeyReused):
        await repository.add(other, keyed("long", other))


async def test_failures_are_counted_until_the_workflow_is_dead_lettered(
    repository: WorkflowRepository,
) -> None:
    workflow = make()
    await repository.add(workflow)
    first = await repository.record_failure(workflow.uuid, T0, max_attempts=2)
    assert first is not None
    assert (first.delivery_attempts, first.dead_lettered_at) == (1, None)
    later = T0 + timedelta(seconds=3)
    second = await repository.record_failure(workflow.uuid, later, max_attempts=2)
    assert second is not None
    assert (second.delivery_attempts, second.dead_lettered_at) == (2, later)
    assert second.status is WorkflowStatus.INSERTED
    assert await repository.get(workflow.uuid) == second
    assert await repository.record_failure(workflow.uuid, later, max_attempts=2) is None


async def test_dead_lettered_workflow_cannot_be_claimed_and_is_listed_apart(
    repository: WorkflowRepository,
) -> None:
    dead, alive = make(), make()
    await repository.add(dead)
    await repository.add(alive)
    await repository.record_failure(dead.uuid, T0, max_attempts=1)

    async def handle(w: Workflow) -> None:
        raise AssertionError("a dead letter must not be handled")

    assert await repository.claim(dead.uuid, handle, T0) is None
    listed = await repository.list(status=None, after=None, limit=10, dead_lettered=True)
    assert [w.uuid for w in listed] == [dead.uuid]
    living = await repository.list(status=None, after=None, limit=10, dead_lettered=False)
    assert [w.uuid for w in living] == [alive.uuid]


async def test_patch_to_inserted_revives_a_dead_letter(repository: WorkflowRepository) -> None:
    workflow = make()
    await repository.add(workflow)
    await repository.record_failure(workflow.uuid, T0, max_attempts=1)
    later = T0 + timedelta(seconds=9)
    change = await repository.set_status(workflow.uuid, WorkflowStatus.INSERTED, later)
    assert change is not None
    assert change.changed
    assert change.workflow == workflow.with_status(WorkflowStatus.INSERTED, later)
    assert (change.workflow.delivery_attempts, change.workflow.dead_lettered_at) == (0, None)


async def test_failures_of_a_consumed_workflow_are_not_counted(
    repository: WorkflowRepository,
) -> None:
    workflow = make()
    await repository.add(workflow)
    await repository.set_status(workflow.uuid, WorkflowStatus.CONSUMED, T0)
    assert await repository.record_failure(workflow.uuid, T0, max_attempts=1) is None
    assert await repository.record_failure(uuid7(), T0, max_attempts=1) is None


async def test_consumed_since_names_the_workflows_consumed_at_or_after_a_time(
    repository: WorkflowRepository,
) -> None:
    untouched, patched, claimed, replayed = (make() for _ in range(4))
    for workflow in (untouched, patched, claimed, replayed):
        await repository.add(workflow)
    await repository.set_status(patched.uuid, WorkflowStatus.CONSUMED, T0 + timedelta(seconds=10))

    async def export(workflow: Workflow) -> None:
        pass

    await repository.claim(claimed.uuid, export, T0 + timedelta(seconds=20))
    await repository.claim(replayed.uuid, export, T0 + timedelta(seconds=20))
    await repository.set_status(replayed.uuid, WorkflowStatus.INSERTED, T0 + timedelta(seconds=30))

    assert set(await repository.consumed_since(T0)) == {patched.uuid, claimed.uuid}
    assert len(await repository.consumed_since(T0)) == 2
    assert await repository.consumed_since(T0 + timedelta(seconds=10, microseconds=1)) == [
        claimed.uuid
    ]
    assert await repository.consumed_since(T0 + timedelta(seconds=20)) == [claimed.uuid]
    assert await repository.consumed_since(T0 + timedelta(days=1)) == []


async def consumed_at(repository: WorkflowRepository, when: datetime, **keys: str) -> Workflow:
    """A workflow consumed at `when`, with the idempotency key `keys["key"]` if given."""
    workflow = make()
    key = keys.get("key")
    await repository.add(workflow, None if key is None else keyed(key, workflow))
    change = await repository.set_status(workflow.uuid, WorkflowStatus.CONSUMED, when)
    assert change is not None
    return change.workflow


async def test_prune_deletes_only_consumed_workflows_older_than_the_time_oldest_first(
    repository: WorkflowRepository,
) -> None:
    old = [await consumed_at(repository, T0 + timedelta(minutes=m)) for m in (3, 1, 2)]
    recent = await consumed_at(repository, T0 + timedelta(hours=1))
    queued, dead = make(), make()
    await repository.add(queued)
    await repository.add(dead)
    await repository.record_failure(dead.uuid, T0, max_attempts=1)
    before, now = T0 + timedelta(minutes=30), T0 + timedelta(days=2)

    assert await repository.count_prunable(before, now) == 3
    first = await repository.prune_consumed(before, now, limit=2)
    assert sorted(first) == sorted([old[1].uuid, old[2].uuid])  # the oldest consumes first
    assert await repository.count_prunable(before, now) == 1
    assert await repository.prune_consumed(before, now, limit=2) == [old[0].uuid]
    assert await repository.prune_consumed(before, now, limit=2) == []
    for workflow in old:
        assert await repository.get(workflow.uuid) is None
    left = await repository.list(status=None, after=None, limit=10)
    assert sorted(w.uuid for w in left) == sorted([recent.uuid, queued.uuid, dead.uuid])
    assert await repository.get(recent.uuid) == recent


async def test_prune_keeps_a_workflow_its_idempotency_key_still_names(
    repository: WorkflowRepository,
) -> None:
    workflow = await consumed_at(repository, T0 + timedelta(minutes=1), key="kept")
    before = T0 + timedelta(minutes=30)
    while_key_holds = T0 + timedelta(minutes=59)  # keyed(): expires an hour after T0
    assert await repository.count_prunable(before, while_key_holds) == 0
    assert await repository.prune_consumed(before, while_key_holds, limit=10) == []
    again = Workflow.new(uuid7(), workflow.data, workflow.steps, while_key_holds)
    assert await repository.add(again, keyed("kept", again)) == workflow  # still replayed

    expired = T0 + timedelta(hours=2)
    assert await repository.prune_consumed(before, expired, limit=10) == [workflow.uuid]
    assert await repository.get(workflow.uuid) is None
    later = Workflow.new(uuid7(), workflow.data, workflow.steps, expired)
    assert await repository.add(later, keyed("kept", later)) == later  # a new request now


async def test_list_with_max_bytes_counts_the_steps_too(repository: WorkflowRepository) -> None:
    """A page counted the documents only: 134 workflows of {"a":1} with 1 MiB of steps each
    made a page of 106 MB, 3 GB of a worker's memory. Each step counts its UTF-8 bytes and
    3 more (its quotes and separator in JSON)."""
    small = '{"a":1}'  # 7 bytes
    steps = ("ab",) * 30 + ("é",) * 10  # 30 x (2 + 3) + 10 x (2 + 3) = 200 bytes
    workflows = [Workflow.new(uuid7(), JsonDocument(small), steps, T0) for _ in range(4)]
    for workflow in workflows:
        await repository.add(workflow)
    assert steps_size(steps) == 200

    async def listed(max_bytes: int) -> int:
        found = await repository.list(status=None, after=None, limit=10, max_bytes=max_bytes)
        return len(found)

    # Running totals before each: 0, 207, 414, 621 (the data alone: 0, 7, 14, 21).
    assert await listed(207) == 2
    assert await listed(208) == 3
    assert await listed(415) == 4

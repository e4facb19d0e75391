"""OutboxRelay with fakes: what it keeps when a batch fails, when it answers the requests,
and how it shares the work between parallel flushes and batches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from uuid import UUID, uuid4

import pytest

from workflows.application.ports import MessagePublisher, Outbox, OutboxEntry
from workflows.application.relay import OutboxRelay
from workflows.domain.errors import DependencyUnavailable


class LockingOutbox(Outbox):
    """Like PostgreSQL's: a claim takes the named and the stale entries (every entry, when
    `all_stale`) that no other claim holds, and deletes them only when its block ends
    normally; `delete` deletes the entries of workflows, held or not."""

    def __init__(self, *, all_stale: bool = False) -> None:
        self.rows: dict[int, UUID] = {}
        self.all_stale = all_stale
        self.stale: set[UUID] = set()
        self.claimed: list[UUID] = []  # every entry a claim took, in order
        self.deleting = asyncio.Event()  # set: deletions go ahead
        self.deleting.set()
        self.delete_fails = False
        self.unqueued: set[UUID] = set()  # workflows consumed from the database
        self.discard_fails = False
        self._held: set[int] = set()

    def add(self, uuid: UUID) -> None:
        self.rows[len(self.rows) + 1 + max(self.rows, default=0)] = uuid

    @contextlib.asynccontextmanager
    async def claim(
        self, uuids: Collection[UUID], *, stale_after: float, limit: int
    ) -> AsyncIterator[list[OutboxEntry]]:
        named = set(uuids)
        taken = [
            OutboxEntry(id, uuid)
            for id, uuid in sorted(self.rows.items())
            if id not in self._held and (self.all_stale or uuid in named or uuid in self.stale)
        ][:limit]
        self._held.update(entry.id for entry in taken)
        self.claimed += [entry.workflow_uuid for entry in taken]
        try:
            yield taken
            await self.deleting.wait()
            for entry in taken:
                del self.rows[entry.id]
        finally:
            self._held.difference_update(entry.id for entry in taken)

    async def delete(self, uuids: Collection[UUID]) -> None:
        await self.deleting.wait()
        if self.delete_fails:
            raise DependencyUnavailable("database", "down for the test")
        gone = set(uuids)
        self.rows = {id: uuid for id, uuid in self.rows.items() if uuid not in gone}

    async def size(self) -> int:
        return len(self.rows)

    async def discard_unqueued(self, uuids: Collection[UUID]) -> set[UUID]:
        if self.discard_fails:
            raise DependencyUnavailable("database", "down for the test")
        named = set(uuids) & self.unqueued
        gone = [id for id, uuid in self.rows.items() if uuid in named and id not in self._held]
        return {self.rows.pop(id) for id in gone}


class RecordingPublisher(MessagePublisher):
    """Records each batch; while `gate` is clear, a batch waits for it (being confirmed)."""

    def __init__(self) -> None:
        self.batches: list[list[UUID]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = False

    async def publish(self, uuids: Sequence[UUID]) -> None:
        self.batches.append(list(uuids))
        await self.gate.wait()
        if self.fail:
            raise DependencyUnavailable("rabbitmq", "the broker nacked the batch")


@contextlib.asynccontextmanager
async def running(relay: OutboxRelay) -> AsyncIterator[None]:
    task = asyncio.create_task(relay.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def until(condition: Callable[[], bool], within: float = 2.0) -> None:
    for _ in range(int(within / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("not in time")


async def test_a_batch_the_broker_refuses_leaves_every_entry_in_the_outbox() -> None:
    outbox, publisher = LockingOutbox(), RecordingPublisher()
    publisher.fail = True
    relay = OutboxRelay(outbox, publisher, confirm_timeout=0.2, outage_backoff=0.0)
    uuids = [uuid4() for _ in range(3)]
    for uuid in uuids:
        outbox.add(uuid)
    async with running(relay):
        answers = await asyncio.gather(*(relay.publish(uuid) for uuid in uuids))
    assert answers == [False, False, False]  # POST answers without its confirm
    assert sorted(outbox.rows.values()) == sorted(uuids)
    assert publisher.batches, "the relay tried"

    publisher.fail = False  # the broker takes them again: the next flush delivers them
    assert await relay.flush() == 0  # no request waits and nothing is stale yet...
    outbox.all_stale = True  # ...until the sweep finds them old enough
    assert await relay.flush() == 3
    assert outbox.rows == {}


async def test_a_request_is_answered_once_confirmed_before_the_deletion_commits() -> None:
    outbox, publisher = LockingOutbox(), RecordingPublisher()
    relay = OutboxRelay(outbox, publisher, confirm_timeout=2.0)
    uuid = uuid4()
    outbox.add(uuid)
    outbox.deleting.clear()  # the DELETE ... COMMIT is slow
    async with running(relay):
        assert await relay.publish(uuid) is True
        assert list(outbox.rows.values()) == [uuid]  # still there: its deletion is pending
        outbox.deleting.set()
        await until(lambda: not outbox.rows)
    assert publisher.batches == [[uuid]]


async def test_parallel_flushes_take_each_entry_once() -> None:
    outbox, publisher = LockingOutbox(), RecordingPublisher()
    relay = OutboxRelay(outbox, publisher, confirm_timeout=2.0, parallel=2)
    first, second = uuid4(), uuid4()
    outbox.add(first)
    outbox.add(second)
    publisher.gate.clear()  # the first batch is still being confirmed...
    async with running(relay):
        answer_first = asyncio.create_task(relay.publish(first))
        await until(lambda: publisher.batches == [[first]])
        answer_second = asyncio.create_task(relay.publish(second))
        await until(lambda: len(publisher.batches) == 2)  # ...and a second flush goes on
        publisher.gate.set()
        assert await answer_first is True
        assert await answer_second is True
        await until(lambda: not outbox.rows)
    assert publisher.batches == [[first], [second]]


async def test_a_backlog_goes_in_full_batches_until_it_is_gone() -> None:
    outbox, publisher = LockingOutbox(all_stale=True), RecordingPublisher()
    relay = OutboxRelay(outbox, publisher, sweep_interval=0.05, batch_limit=500, parallel=1)
    backlog = [uuid4() for _ in range(1234)]
    for uuid in backlog:
        outbox.add(uuid)
    async with running(relay):
        await until(lambda: not outbox.rows)
    assert [len(batch) for batch in publisher.batches[:3]] == [500, 500, 234]
    assert [uuid for batch in publisher.batches for uuid in batch] == backlog


async def test_waiting_entries_are_published_at_once_without_a_claim() -> None:
    outbox, publisher = LockingOutbox(), RecordingPublisher()
    relay = OutboxRelay(outbox, publisher, confirm_timeout=2.0)
    uuids = [uuid4() for _ in range(3)]
    for uuid in uuids:
        outbox.add(uuid)
    async with running(relay):
        assert await asyncio.gather(*(relay.publish(uuid) for uuid in uuids)) == [True] * 3
        await until(lambda: not outbox.rows)
    assert sorted(uuid for batch in publisher.batches for uuid in batch) == sorted(uuids)
    assert outbox.claimed == []  # no claim: no other relay takes an entry this fresh


async def test_stale_entries_are_swept_while_requests_keep_the_relay_busy() -> None:
    outbox, publisher = LockingOutbox(), RecordingPublisher()
    relay = OutboxRelay(outbox, publisher, confirm_timeout=2.0, sweep_interval=0.05)
    left_behind = uuid4()  # by a crashed process: no request waits for it
    outbox.add(left_behind)
    outbox.stale.add(left_behind)
    busy = True

    async def requests() -> None:
        while busy:  # a request every 10 ms: the relay is woken long before each sweep
            uuid = uuid4()
            outbox.add(uuid)
            await relay.publish(uuid)
            await asyncio.sleep(0.01)

    async with running(relay):
        load = asyncio.create_task(requests())
        await until(lambda: left_behind in outbox.claimed, within=1.0)
        busy = False
        await load
    assert any(left_behind in batch for batch in publisher.batches)
    assert left_behind not in outbox.rows.values()


async def test_a_failed_deletion_keeps_the_entries_for_a_sweep() -> None:
    outbox, publisher = LockingOutbox(), RecordingPublisher()
    relay = OutboxRelay(outbox, publisher, confirm_timeout=2.0)
    uuid = uuid4()
    outbox.add(uuid)
    outbox.delete_fails = True
    async with running(relay):
        assert await relay.publish(uuid) is True  # confirmed: the message is safe
        await until(lambda: len(publisher.batches) == 1)
    assert list(outbox.rows.values()) == [uuid]  # published again by a sweep, later
    outbox.delete_fails, outbox.all_stale = False, True
    assert await relay.flush() == 1
    assert outbox.rows == {}


async def test_handed_over_entries_are_published_after_the_delay_without_a_claim() -> None:
    outbox, publisher = LockingOutbox(), RecordingPublisher()
    relay = OutboxRelay(outbox, publisher, sweep_interval=60.0, hand_over_delay=0.3)
    uuids = [uuid4() for _ in range(3)]
    async with running(relay):
        for uuid in uuids:
            outbox.add(uuid)
            relay.hand_over(uuid)  # nobody waits for the confirm
        await asyncio.sleep(0.1)
        assert publisher.batches == []  # a consume may still take them from the database
        await until(lambda: not outbox.rows)
    assert publisher.batches == [uuids]  # together, in order
    assert outbox.claimed == []


async def test_handed_over_entries_of_workflows_consumed_meanwhile_are_never_published() -> None:
    outbox, publisher = LockingOutbox(), RecordingPublisher()
    relay = OutboxRelay(outbox, publisher, sweep_interval=60.0, hand_over_delay=0.05)
    taken, queued, also_taken = uuid4(), uuid4(), uuid4()
    async with running(relay):
        for uuid in (taken, queued, also_taken):
            outbox.add(uuid)
            relay.hand_over(uuid)
        outbox.unqueued.update((taken, also_taken))  # consumed before the delay was over
        await until(lambda: not outbox.rows)
    assert publisher.batches == [[queued]]


async def test_handed_over_entries_are_published_when_the_database_cannot_say() -> None:
    outbox, publisher = LockingOutbox(), RecordingPublisher()
    relay = OutboxRelay(outbox, publisher, sweep_interval=60.0, hand_over_delay=0.0)
    taken, queued = uuid4(), uuid4()
    outbox.unqueued.add(taken)
    outbox.discard_fails = True
    async with running(relay):
        for uuid in (taken, queued):
            outbox.add(uuid)
            relay.hand_over(uuid)
        await until(lambda: not outbox.rows)
    assert publisher.batches == [[taken, queued]]  # a message too many is only skipped


async def test_entries_handed_over_while_the_broker_is_down_are_left_to_the_sweep() -> None:
    outbox, publisher = LockingOutbox(), RecordingPublisher()
    relay = OutboxRelay(outbox, publisher, sweep_interval=60.0, outage_backoff=60.0)
    publisher.fail = True
    first, second = uuid4(), uuid4()
    async with running(relay):
        outbox.add(first)
        relay.hand_over(first)
        await until(lambda: publisher.batches == [[first]])
        await asyncio.sleep(0.01)  # the failure is seen: the relay backs off
        outbox.add(second)
        relay.hand_over(second)  # not taken: only a sweep will publish it
        await asyncio.sleep(0.05)
    assert publisher.batches == [[first]]
    assert sorted(outbox.rows.values()) == sorted([first, second])
    publisher.fail, outbox.all_stale = False, True
    assert await relay.flush() == 2


async def test_no_more_than_max_handed_over_entries_wait_in_memory() -> None:
    outbox, publisher = LockingOutbox(), RecordingPublisher()
    relay = OutboxRelay(outbox, publisher, sweep_interval=60.0, parallel=1, max_handed_over=2)
    uuids = [uuid4() for _ in range(4)]
    for uuid in uuids:
        outbox.add(uuid)
    publisher.gate.clear()  # the first batch is being confirmed
    async with running(relay):
        relay.hand_over(uuids[0])
        await until(lambda: publisher.batches == [[uuids[0]]])
        for uuid in uuids[1:]:
            relay.hand_over(uuid)  # the last finds two waiting already: left to the sweep
        publisher.gate.set()
        await until(lambda: list(outbox.rows.values()) == [uuids[3]])
        await asyncio.sleep(0.05)
    assert publisher.batches == [[uuids[0]], uuids[1:3]]


async def test_a_stopping_relay_publishes_the_entries_handed_over_before_they_are_due() -> None:
    outbox, publisher = LockingOutbox(), RecordingPublisher()
    relay = OutboxRelay(outbox, publisher, sweep_interval=60.0, hand_over_delay=60.0)
    uuids = [uuid4() for _ in range(3)]
    async with running(relay):
        for uuid in uuids:
            outbox.add(uuid)
            relay.hand_over(uuid)
        await asyncio.sleep(0.05)
        assert publisher.batches == []  # not due for a minute
    assert publisher.batches == [uuids]  # stopped: published at once, not left to a sweep
    assert outbox.rows == {}
    assert outbox.claimed == []


async def test_a_stopping_relay_lets_the_flush_on_its_way_finish() -> None:
    outbox, publisher = LockingOutbox(), RecordingPublisher()
    relay = OutboxRelay(outbox, publisher, sweep_interval=60.0, hand_over_delay=0.0)
    uuid = uuid4()
    outbox.add(uuid)
    publisher.gate.clear()  # the batch is being confirmed when the relay is stopped
    task = asyncio.create_task(relay.run())
    relay.hand_over(uuid)
    await until(lambda: publisher.batches == [[uuid]])
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # waiting for the confirm
    publisher.gate.set()
    await asyncio.gather(task, return_exceptions=True)
    assert outbox.rows == {}  # confirmed, then deleted: nothing left for a sweep


async def test_a_stopping_relay_gives_up_after_stop_within() -> None:
    outbox, publisher = LockingOutbox(), RecordingPublisher()
    relay = OutboxRelay(
        outbox, publisher, sweep_interval=60.0, hand_over_delay=60.0, stop_within=0.2
    )
    uuid = uuid4()
    outbox.add(uuid)
    publisher.gate.clear()  # the broker never confirms
    task = asyncio.create_task(relay.run())
    relay.hand_over(uuid)
    await asyncio.sleep(0.01)
    task.cancel()
    async with asyncio.timeout(1.0):
        await asyncio.gather(task, return_exceptions=True)
    assert publisher.batches == [[uuid]]
    assert list(outbox.rows.values()) == [uuid]  # left in the outbox, for a sweep


async def test_a_broker_outage_is_logged_when_it_starts_and_when_it_is_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every flush and sweep retries while the broker is away: one WARNING when the
    publishes start failing, one INFO when one is confirmed again, not a line per try."""
    outbox, publisher = LockingOutbox(all_stale=True), RecordingPublisher()
    publisher.fail = True
    relay = OutboxRelay(outbox, publisher, confirm_timeout=0.2, outage_backoff=0.0)
    outbox.add(uuid4())
    with caplog.at_level(logging.INFO, logger="workflows.application"):
        for _ in range(5):
            assert await relay.flush() == 0
        publisher.fail = False
        assert await relay.flush() == 1
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert len(publisher.batches) == 6
    assert lines[0] == (
        logging.WARNING,
        "outbox relay: entries not confirmed, retrying: "
        "rabbitmq is unavailable: the broker nacked the batch",
    )
    assert lines[1][0] == logging.INFO
    assert lines[1][1].startswith("outbox relay: confirmed again, after 5 failures in ")
    assert lines[1][1].endswith(" s (4 not logged)")
    assert len(lines) == 2

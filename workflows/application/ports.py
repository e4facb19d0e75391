"""The ports: what the use cases need from the outside world, and what each must guarantee."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from uuid import UUID

import attrs

from workflows.domain.model import IdempotencyKey, Workflow, WorkflowStatus

Clock = Callable[[], datetime]
IdFactory = Callable[[], UUID]
ClaimHandler = Callable[[Workflow], Awaitable[None]]


class ClaimerGone(Exception):
    """A ClaimHandler raises it when the caller it works for has gone: the workflow stays
    queued like any whose handler raised, but the workflow did not fail, so nothing counts
    it as a failed delivery."""


@attrs.frozen
class StatusChange:
    workflow: Workflow
    changed: bool


class WorkflowRepository(abc.ABC):
    """Stores workflows durably. Each method is atomic: it does all it says or nothing."""

    @abc.abstractmethod
    async def add(self, workflow: Workflow, idempotency: IdempotencyKey | None = None) -> Workflow:
        """Store a new workflow (and its outbox entry, when this repository feeds one) and
        return it. With an idempotency key that is already held and not expired, store
        nothing and return the workflow the key names instead, or raise
        IdempotencyKeyReused when the fingerprints differ. Concurrent adds with one key
        store one workflow."""

    @abc.abstractmethod
    async def purge_expired_keys(self, now: datetime) -> int:
        """Forget idempotency keys that expired before `now`; how many were forgotten."""

    @abc.abstractmethod
    async def get(self, uuid: UUID) -> Workflow | None: ...

    @abc.abstractmethod
    async def consumed_since(self, since: datetime) -> list[UUID]:
        """The uuids of the CONSUMED workflows whose `updated_at` is at or after `since`."""

    @abc.abstractmethod
    async def prune_consumed(self, before: datetime, now: datetime, limit: int) -> list[UUID]:
        """Delete up to `limit` CONSUMED workflows whose `updated_at` is before `before`,
        those consumed longest ago first, and return their uuids. A workflow that an
        idempotency key not expired at `now` names is kept (a retried POST must still get
        it), and so is one another transaction holds (a PATCH under way): a later call
        takes it."""

    @abc.abstractmethod
    async def count_prunable(self, before: datetime, now: datetime) -> int:
        """How many workflows `prune_consumed(before, now, ...)` would delete in all."""

    @abc.abstractmethod
    async def list(
        self,
        *,
        status: WorkflowStatus | None,
        after: UUID | None,
        limit: int,
        dead_lettered: bool | None = None,
        max_bytes: int | None = None,
    ) -> list[Workflow]:
        """Workflows in uuid order (oldest first), strictly after `after` when given, only
        (or none of) the dead-lettered ones when `dead_lettered` is True (False), at most
        `limit` of them.

        With `max_bytes`, the list also ends at the first workflow whose predecessors in it
        hold `max_bytes` or more of data (`JsonDocument.size`), and includes it: the caller
        can tell a page cut short by its size from the end of the rows, and no list holds
        much more data than `max_bytes` plus two documents."""

    @abc.abstractmethod
    async def set_status(
        self, uuid: UUID, status: WorkflowStatus, now: datetime
    ) -> StatusChange | None:
        """Set the status (as `Workflow.with_status` does); None for an unknown uuid.
        Setting the current status changes nothing (not even `updated_at`), except that
        INSERTED revives a dead-lettered workflow. A change to INSERTED also writes an
        outbox entry, when this repository feeds one, in the same transaction."""

    @abc.abstractmethod
    async def record_failure(self, uuid: UUID, now: datetime, max_attempts: int) -> Workflow | None:
        """Count a failed consume of a queued workflow (`Workflow.with_failure`); None,
        changing nothing, when the uuid is unknown or the workflow is not queued."""

    @abc.abstractmethod
    async def claim(self, uuid: UUID, handle: ClaimHandler, now: datetime) -> Workflow | None:
        """Lock the workflow; if it is queued, await `handle(workflow)`, then mark it
        CONSUMED, all in one transaction, and return it. None, changing nothing, when the
        uuid is unknown or the workflow is not queued (consumed or dead-lettered). If
        `handle` raises, nothing changes and the error propagates. Concurrent claims of
        one uuid: exactly one succeeds."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise DependencyUnavailable unless the store answers."""


class WorkflowQueue(abc.ABC):
    """Hands each enqueued workflow to exactly one successful consume; loses none."""

    @abc.abstractmethod
    async def enqueued(self, workflow: Workflow) -> None:
        """The repository has just stored `workflow` as INSERTED: make it consumable.
        Never raises for broker trouble once the repository has committed: a durable
        outbox (or the row itself) already guarantees delivery."""

    @abc.abstractmethod
    async def consume(self, handle: ClaimHandler, now: datetime) -> Workflow | None:
        """Claim the oldest queued workflow (INSERTED, not dead-lettered), run `handle` on
        it and mark it CONSUMED in one step; None when nothing is queued. If `handle`
        raises, the workflow stays queued (a broker may move it behind the others). One
        call takes at most one workflow and leaves every other in place."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise DependencyUnavailable unless the queue answers."""


class Exporter(abc.ABC):
    """Turns a workflow's data into a file a worker can take away."""

    media_type: str

    @abc.abstractmethod
    async def render(self, workflow: Workflow) -> bytes:
        """The file's content: a pure function of `workflow.data`. A large document may be
        rendered off the event loop, so that the loop's other requests go on meanwhile."""

    @abc.abstractmethod
    async def write(
        self, workflow: Workflow, content: bytes, consumed_at: datetime | None = None
    ) -> None:
        """Store `content` as this workflow's export, atomically (all or nothing): durable
        when this returns, or, given `consumed_at` (when the consume that took the workflow
        began, its `updated_at`), by the next `flush` instead."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every export written so far durable, and record that it is."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise DependencyUnavailable unless an export could be written now (the
        readiness check)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Let go of what the exporter holds (threads, open files), once no more exports
        are written."""

    @abc.abstractmethod
    async def unflushed_since(self) -> datetime | None:
        """After a crash: exports that may not be durable belong to workflows consumed at or
        after this time (None: there are none). Read once, before `suspects`."""

    @abc.abstractmethod
    async def suspects(self, uuids: Collection[UUID]) -> list[UUID]:
        """Of these workflows, those whose export may have been written after the last
        flush, and so may be torn by a power failure."""

    @abc.abstractmethod
    async def remove(self, uuids: Collection[UUID]) -> int:
        """Remove the exports of these workflows (`workflows prune`); how many there were."""

    @abc.abstractmethod
    async def remove_older_than(self, before: datetime, *, dry_run: bool = False) -> int:
        """Remove every export last written before `before`, and what an interrupted write
        left; how many files (with `dry_run`, how many would go, removing nothing)."""

    @abc.abstractmethod
    async def repair(self, workflow: Workflow, content: bytes) -> bool:
        """If this workflow has an export and it is not `content`, replace it durably;
        True when it did."""


@attrs.frozen
class OutboxEntry:
    id: int
    workflow_uuid: UUID


class Outbox(abc.ABC):
    """Durable record of queue messages that the broker has not yet confirmed."""

    @abc.abstractmethod
    def claim(
        self, uuids: Collection[UUID], *, stale_after: float, limit: int
    ) -> AbstractAsyncContextManager[list[OutboxEntry]]:
        """Lock the entries of these workflows, plus any entry older than `stale_after`
        seconds, that no one else holds (at most `limit`). Leaving the block normally
        deletes them; leaving it by an exception keeps them for a later try."""

    @abc.abstractmethod
    async def delete(self, uuids: Collection[UUID]) -> None:
        """Delete the entries of these workflows, at once (one statement, committed): the
        relay calls it for entries whose messages the broker has confirmed."""

    @abc.abstractmethod
    async def size(self) -> int: ...

    @abc.abstractmethod
    async def discard_unqueued(self, uuids: Collection[UUID]) -> set[UUID]:
        """Delete the entries of those of these workflows that are not queued (a consume
        took them from the database before their messages were published: none is needed)
        and return those workflows. At once (one statement, committed); an entry another
        transaction holds is left alone, and an entry written after the statement began
        (a replay's) is kept."""


class MessagePublisher(abc.ABC):
    """Publishes workflow messages to the broker."""

    @abc.abstractmethod
    async def publish(self, uuids: Sequence[UUID]) -> None:
        """Publish one persistent message per uuid, in order, and return only once the
        broker has confirmed every one; raise DependencyUnavailable otherwise."""

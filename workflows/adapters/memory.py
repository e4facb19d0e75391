"""In-memory adapters: for unit tests and throwaway demos. Everything is lost on exit."""

from __future__ import annotations

import asyncio
import bisect
from collections import deque
from datetime import datetime
from uuid import UUID

from workflows.application.ports import (
    ClaimHandler,
    StatusChange,
    WorkflowQueue,
    WorkflowRepository,
)
from workflows.domain.errors import IdempotencyKeyReused
from workflows.domain.model import IdempotencyKey, Workflow, WorkflowStatus, steps_size


class InMemoryWorkflowRepository(WorkflowRepository):
    def __init__(self) -> None:
        self._rows: dict[UUID, Workflow] = {}
        self._order: list[UUID] = []
        self._locks: dict[UUID, asyncio.Lock] = {}
        self._keys: dict[str, IdempotencyKey] = {}
        self._key_owner: dict[str, UUID] = {}

    async def add(self, workflow: Workflow, idempotency: IdempotencyKey | None = None) -> Workflow:
        if workflow.uuid in self._rows:
            raise ValueError(f"duplicate uuid {workflow.uuid}")
        if idempotency is not None:
            held = self._keys.get(idempotency.key)
            if held is not None and held.expires_at > workflow.created_at:
                if held.fingerprint != idempotency.fingerprint:
                    raise IdempotencyKeyReused(idempotency.key)
                return self._rows[self._key_owner[idempotency.key]]
            self._keys[idempotency.key] = idempotency
            self._key_owner[idempotency.key] = workflow.uuid
        self._rows[workflow.uuid] = workflow
        bisect.insort(self._order, workflow.uuid)
        return workflow

    async def purge_expired_keys(self, now: datetime) -> int:
        expired = [key for key, held in self._keys.items() if held.expires_at <= now]
        for key in expired:
            del self._keys[key], self._key_owner[key]
        return len(expired)

    async def get(self, uuid: UUID) -> Workflow | None:
        return self._rows.get(uuid)

    async def consumed_since(self, since: datetime) -> list[UUID]:
        return [
            uuid
            for uuid, row in self._rows.items()
            if row.status is WorkflowStatus.CONSUMED and row.updated_at >= since
        ]

    async def prune_consumed(self, before: datetime, now: datetime, limit: int) -> list[UUID]:
        doomed = self._prunable(before, now)[:limit]
        for workflow in doomed:
            del self._rows[workflow.uuid]
            self._order.pop(bisect.bisect_left(self._order, workflow.uuid))
            self._locks.pop(workflow.uuid, None)
        return [workflow.uuid for workflow in doomed]

    async def count_prunable(self, before: datetime, now: datetime) -> int:
        return len(self._prunable(before, now))

    def _prunable(self, before: datetime, now: datetime) -> list[Workflow]:
        named = {self._key_owner[key] for key, held in self._keys.items() if held.expires_at > now}
        found = [
            workflow
            for workflow in self._rows.values()
            if workflow.status is WorkflowStatus.CONSUMED
            and workflow.updated_at < before
            and workflow.uuid not in named
            and not (workflow.uuid in self._locks and self._locks[workflow.uuid].locked())
        ]
        return sorted(found, key=lambda workflow: workflow.updated_at)

    async def list(
        self,
        *,
        status: WorkflowStatus | None,
        after: UUID | None,
        limit: int,
        dead_lettered: bool | None = None,
        max_bytes: int | None = None,
    ) -> list[Workflow]:
        start = 0 if after is None else bisect.bisect_right(self._order, after)
        found: list[Workflow] = []
        before = 0  # data of the workflows found before this one
        for uuid in self._order[start:]:
            workflow = self._rows[uuid]
            dead = workflow.dead_lettered_at is not None
            if (status is None or workflow.status is status) and (
                dead_lettered is None or dead is dead_lettered
            ):
                found.append(workflow)
                if len(found) == limit or (max_bytes is not None and before >= max_bytes):
                    break
                before += workflow.data.size + steps_size(workflow.steps)
        return found

    async def set_status(
        self, uuid: UUID, status: WorkflowStatus, now: datetime
    ) -> StatusChange | None:
        async with self._lock(uuid):
            workflow = self._rows.get(uuid)
            if workflow is None:
                return None
            if workflow.status is status and workflow.dead_lettered_at is None:
                return StatusChange(workflow, changed=False)
            workflow = self._rows[uuid] = workflow.with_status(status, now)
            return StatusChange(workflow, changed=True)

    async def record_failure(self, uuid: UUID, now: datetime, max_attempts: int) -> Workflow | None:
        async with self._lock(uuid):
            workflow = self._rows.get(uuid)
            if workflow is None or not workflow.queued:
                return None
            workflow = self._rows[uuid] = workflow.with_failure(now, max_attempts)
            return workflow

    async def claim(self, uuid: UUID, handle: ClaimHandler, now: datetime) -> Workflow | None:
        async with self._lock(uuid):
            workflow = self._rows.get(uuid)
            if workflow is None or not workflow.queued:
                return None
            await handle(workflow)
            workflow = self._rows[uuid] = workflow.with_status(WorkflowStatus.CONSUMED, now)
            return workflow

    async def ping(self) -> None:
        return None

    def _lock(self, uuid: UUID) -> asyncio.Lock:
        return self._locks.setdefault(uuid, asyncio.Lock())


class InMemoryQueue(WorkflowQueue):
    """A FIFO of uuids in front of a repository, as a broker would be."""

    def __init__(self, repository: WorkflowRepository) -> None:
        self._repository = repository
        self._pending: deque[UUID] = deque()

    async def enqueued(self, workflow: Workflow) -> None:
        self._pending.append(workflow.uuid)

    async def consume(self, handle: ClaimHandler, now: datetime) -> Workflow | None:
        while self._pending:
            uuid = self._pending.popleft()
            try:
                claimed = await self._repository.claim(uuid, handle, now)
            except BaseException:
                self._pending.appendleft(uuid)
                raise
            if claimed is not None:
                return claimed
        return None

    async def ping(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._pending)

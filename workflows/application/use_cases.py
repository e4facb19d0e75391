"""The use cases: one small class per verb, built by the container."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from uuid import UUID

import attrs

from workflows.application.doorbell import Doorbell
from workflows.application.ports import (
    ClaimerGone,
    Clock,
    Exporter,
    IdFactory,
    WorkflowQueue,
    WorkflowRepository,
)
from workflows.domain.errors import DependencyUnavailable, WorkflowNotFound
from workflows.domain.model import (
    IdempotencyKey,
    JsonDocument,
    Workflow,
    WorkflowStatus,
    steps_size,
)

log = logging.getLogger(__name__)


@attrs.frozen
class Created:
    workflow: Workflow
    replayed: bool
    """True when an idempotency key named an earlier request: nothing new was stored."""


@attrs.define
class CreateWorkflow:
    repository: WorkflowRepository
    queue: WorkflowQueue
    clock: Clock
    new_id: IdFactory
    idempotency_ttl: timedelta = timedelta(hours=24)
    doorbell: Doorbell = attrs.field(factory=Doorbell)

    async def __call__(
        self, data: JsonDocument, steps: tuple[str, ...], idempotency_key: str | None = None
    ) -> Created:
        now = self.clock()
        workflow = Workflow.new(self.new_id(), data, steps, now)
        idempotency = None
        if idempotency_key is not None:
            fingerprint = IdempotencyKey.fingerprint_of(data, steps)
            idempotency = IdempotencyKey(idempotency_key, fingerprint, now + self.idempotency_ttl)
        stored = await self.repository.add(workflow, idempotency)
        if stored.uuid != workflow.uuid:
            return Created(stored, replayed=True)
        await self.queue.enqueued(workflow)
        self.doorbell.ring()
        return Created(workflow, replayed=False)


@attrs.define
class GetWorkflow:
    repository: WorkflowRepository

    async def __call__(self, uuid: UUID) -> Workflow:
        workflow = await self.repository.get(uuid)
        if workflow is None:
            raise WorkflowNotFound(uuid)
        return workflow


LIST_PAGE_BYTES = 8 * 1024 * 1024
"""Data (UTF-8 bytes of the documents) after which a list page ends, whatever its `limit`."""


@attrs.frozen
class Page:
    workflows: list[Workflow]
    more: bool
    """Whether workflows follow the page's last one (the next page is not empty)."""


@attrs.define
class ListWorkflows:
    """A page of at most `limit` workflows, ending early at the first whose predecessors on
    the page hold `max_bytes` of data: a page of large documents costs the process memory
    in proportion to its size (about 3 times it while it is built and sent), not to its
    `limit` (1,000 documents of 1 MiB would be 1 GB). A page has at least one workflow
    when any follow `after`."""

    repository: WorkflowRepository
    max_bytes: int = LIST_PAGE_BYTES

    async def __call__(
        self,
        *,
        status: WorkflowStatus | None,
        after: UUID | None,
        limit: int,
        dead_lettered: bool | None = None,
    ) -> Page:
        found = await self.repository.list(
            status=status,
            after=after,
            limit=limit + 1,
            dead_lettered=dead_lettered,
            max_bytes=self.max_bytes,
        )
        size = 0
        for taken, workflow in enumerate(found):
            if taken == limit or size >= self.max_bytes:
                return Page(found[:taken], more=True)
            size += workflow.data.size + steps_size(workflow.steps)
        return Page(found, more=False)


@attrs.define
class UpdateStatus:
    """PATCH: consumed→inserted replays the workflow; inserted→consumed takes it out of
    play; setting the status it already has changes nothing and enqueues nothing."""

    repository: WorkflowRepository
    queue: WorkflowQueue
    clock: Clock
    doorbell: Doorbell = attrs.field(factory=Doorbell)

    async def __call__(self, uuid: UUID, status: WorkflowStatus) -> Workflow:
        change = await self.repository.set_status(uuid, status, self.clock())
        if change is None:
            raise WorkflowNotFound(uuid)
        if change.changed and status is WorkflowStatus.INSERTED:
            await self.queue.enqueued(change.workflow)
            self.doorbell.ring()
        return change.workflow


@attrs.frozen
class Consumed:
    workflow: Workflow
    content: bytes


@attrs.define
class ConsumeWorkflow:
    """Take the oldest queued workflow, write its export, mark it consumed.

    With `wait`, a call that finds nothing waits up to that many seconds for the doorbell
    and tries again when it wakes it; `still_wanted` is asked before every try, so a client
    that has gone away takes nothing (and a ring that woke it wakes another waiter)."""

    queue: WorkflowQueue
    exporter: Exporter
    clock: Clock
    doorbell: Doorbell = attrs.field(factory=Doorbell)
    repository: WorkflowRepository | None = None
    """Where failed exports are counted; without it nothing is ever dead-lettered."""
    max_attempts: int = 5
    recheck_every: float = 5.0
    """A waiter also looks again this often, in case a ring was lost (a dropped LISTEN)."""

    async def __call__(
        self, wait: float = 0.0, still_wanted: Callable[[], Awaitable[bool]] | None = None
    ) -> Consumed | None:
        deadline = time.monotonic() + wait
        woken = False  # by the doorbell, and not looked yet: a turn to pass on if unused
        try:
            while True:
                if still_wanted is not None and not await still_wanted():
                    return None  # the client has gone: take nothing it could not receive
                ticket = self.doorbell.ticket()
                consumed = await self._once(still_wanted)
                woken = False
                remaining = deadline - time.monotonic()
                if consumed is not None or remaining <= 0 or self.doorbell.closed:
                    return consumed
                woken = await self.doorbell.wait(ticket, min(remaining, self.recheck_every))
                if not woken and time.monotonic() >= deadline:
                    return None
        finally:
            if woken:
                self.doorbell.pass_on()  # a ring woke this call for a workflow it did not take

    async def _once(
        self, still_wanted: Callable[[], Awaitable[bool]] | None = None
    ) -> Consumed | None:
        exported: list[bytes] = []
        failed: list[Workflow] = []
        now = self.clock()  # the consumed workflow's updated_at

        async def export(workflow: Workflow) -> None:
            try:
                content = await self.exporter.render(workflow)
                # Asked again with the CSV made, before the file and the commit: a client
                # that left while its row was claimed and rendered (a large document takes
                # a while) leaves it queued, rather than consumed with no one to answer.
                if still_wanted is not None and not await still_wanted():
                    raise ClaimerGone
                await self.exporter.write(workflow, content, now)
            except (DependencyUnavailable, ClaimerGone):
                raise  # not the workflow's fault: no attempt counted
            except Exception:
                failed.append(workflow)
                raise
            exported.append(content)

        try:
            workflow = await self.queue.consume(export, now)
        except ClaimerGone:
            self.doorbell.ring()  # queued again, its claim over: a waiter may take it
            return None
        except Exception:
            if failed:
                await self._put_back(failed[-1])
            raise
        if workflow is None:
            return None
        return Consumed(workflow, exported[-1])

    async def _put_back(self, workflow: Workflow) -> None:
        """A failed export left `workflow` queued: count the failure and, unless that
        dead-lettered it, ring, so that a consumer waiting in any process takes it now
        rather than at its next look (up to `recheck_every` later)."""
        if self.repository is not None:
            counted = await self.repository.record_failure(
                workflow.uuid, self.clock(), self.max_attempts
            )
            if counted is not None and counted.dead_lettered_at is not None:
                log.error(
                    "workflow %s dead-lettered after %d failed consumes",
                    workflow.uuid,
                    counted.delivery_attempts,
                )
                return
        self.doorbell.ring()


@attrs.define
class ExportWorkflow:
    """The export of any workflow, whatever its status; changes nothing."""

    repository: WorkflowRepository
    exporter: Exporter

    async def __call__(self, uuid: UUID) -> bytes:
        workflow = await self.repository.get(uuid)
        if workflow is None:
            raise WorkflowNotFound(uuid)
        return await self.exporter.render(workflow)

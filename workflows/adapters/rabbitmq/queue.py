"""The workflow queue on RabbitMQ: uuids on the broker, the repository the truth."""

from __future__ import annotations

import logging
from datetime import datetime
from uuid import UUID

from workflows.adapters.rabbitmq.broker import RabbitMqBroker
from workflows.application.ports import ClaimHandler, Outbox, WorkflowQueue, WorkflowRepository
from workflows.application.relay import OutboxRelay
from workflows.domain.model import Workflow

log = logging.getLogger(__name__)


class RabbitMqQueue(WorkflowQueue):
    """A RabbitMQ queue of uuids in front of the repository, which stays the truth: a
    message whose workflow is unknown or no longer INSERTED (a duplicate from a retried
    publish, or a workflow PATCHed to consumed) is acked and skipped.

    With `wait_for_confirm` False, `enqueued` hands the committed outbox entry to the relay
    and returns at once; a consume that finds the broker's queue empty then reads the
    oldest entries still in the outbox (`unconfirmed`), asks the broker again (a message
    confirmed meanwhile goes first: it is older), and claims the oldest of those queued
    workflows that no other consume is taking (`claim_any`), so a workflow is consumable
    from its commit on, published or not. Its message, when it comes, is a duplicate that
    consumers skip.

    With a broker that prefetches, a message another process holds is in no queue this one
    can see; so when all of the above finds nothing, the consume takes the oldest queued
    workflow from `fallback` (the repository's own queue: the INSERTED rows, `SKIP
    LOCKED`), and the held message, when its holder gets to it, is skipped."""

    def __init__(
        self,
        repository: WorkflowRepository,
        broker: RabbitMqBroker,
        relay: OutboxRelay,
        outbox: Outbox,
        *,
        wait_for_confirm: bool = False,
        unconfirmed_batch: int = 16,
        fallback: WorkflowQueue | None = None,
    ) -> None:
        self._repository = repository
        self._broker = broker
        self._relay = relay
        self._outbox = outbox
        self._wait_for_confirm = wait_for_confirm
        self._unconfirmed_batch = unconfirmed_batch
        self._fallback = fallback

    async def enqueued(self, workflow: Workflow) -> None:
        if not self._wait_for_confirm:
            self._relay.hand_over(workflow.uuid)
        elif not await self._relay.publish(workflow.uuid):
            log.info("workflow %s not confirmed yet: the outbox keeps it", workflow.uuid)

    async def consume(self, handle: ClaimHandler, now: datetime) -> Workflow | None:
        claimed = await self._from_broker(handle, now)
        if claimed is not None:
            return claimed
        # The oldest of them that is queued and not being claimed by another consume: one
        # statement, which skips the rows other fallbacks hold rather than queue behind them.
        unconfirmed = await self._outbox.unconfirmed(self._unconfirmed_batch)
        # An entry deleted between the broker's answer and that read was confirmed before
        # its deletion: its message, older than every entry read, is in the queue now.
        claimed = await self._from_broker(handle, now)
        if claimed is not None:
            return claimed
        claimed = await self._repository.claim_any(unconfirmed, handle, now)
        if claimed is not None:
            return claimed
        # Likewise for an entry deleted since the broker was last asked.
        claimed = await self._from_broker(handle, now)
        if claimed is not None or self._fallback is None:
            return claimed
        return await self._fallback.consume(handle, now)

    async def _from_broker(self, handle: ClaimHandler, now: datetime) -> Workflow | None:
        while (delivery := await self._broker.get()) is not None:
            uuid = _parse_uuid(delivery.body)
            if uuid is None:
                log.error("dropping a malformed message from the queue: %r", delivery.body)
                self._broker.ack(delivery)
                continue
            try:
                claimed = await self._repository.claim(uuid, handle, now)
            except BaseException:
                self._broker.requeue(delivery)
                raise
            self._broker.ack(delivery)  # after the commit: a lost ack only redelivers a skip
            if claimed is not None:
                return claimed
        return None

    async def ping(self) -> None:
        await self._broker.ping()

    async def sweep_dead_letters(self, now: datetime) -> int:
        """Record, in the repository, the workflows whose messages the broker dead-lettered
        (its delivery limit caught a crash loop that never reached a failure count); how
        many messages were swept."""
        swept = 0
        while (delivery := await self._broker.get(dead=True)) is not None:
            uuid = _parse_uuid(delivery.body)
            if uuid is not None:
                try:
                    await self._repository.record_failure(uuid, now, max_attempts=1)
                except BaseException:
                    self._broker.requeue(delivery)
                    raise
                log.error("the broker dead-lettered workflow %s", uuid)
            self._broker.ack(delivery)
            swept += 1
        return swept


def _parse_uuid(body: bytes) -> UUID | None:
    try:
        return UUID(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None

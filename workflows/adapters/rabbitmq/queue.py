"""The workflow queue on RabbitMQ: uuids on the broker, the repository the truth."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from uuid import UUID

from workflows.adapters.rabbitmq.broker import RabbitMqBroker
from workflows.adapters.rabbitmq.delivery import Delivery
from workflows.application.ports import (
    ClaimerGone,
    ClaimHandler,
    WorkflowQueue,
    WorkflowRepository,
)
from workflows.application.relay import OutboxRelay
from workflows.domain.errors import DependencyUnavailable
from workflows.domain.model import Workflow

log = logging.getLogger(__name__)

BROKER_RETRY_AFTER = 1.0
"""Seconds the consumes leave the broker alone after it failed one of them (they take
from the database's rows meanwhile): one connection attempt a second, not one per consume."""
BROKER_STALLED_AFTER = 0.25
"""Seconds after which a get (or the connection's opening) the broker has not answered
sends the next consumes to the rows instead of behind it: a hung broker holds one consume
for the call timeout, not each one (a quorum queue answers a get in a few ms)."""


class RabbitMqQueue(WorkflowQueue):
    """A RabbitMQ queue of uuids in front of the repository, which stays the truth: a
    message whose workflow is unknown or no longer INSERTED (a duplicate from a retried
    publish, or a workflow PATCHed to consumed) is acked and skipped.

    With `wait_for_confirm` False, `enqueued` hands the committed outbox entry to the relay
    and returns at once. A consume that gets no message from the broker (its queue is
    empty, or what is queued is held by other processes' prefetching consumers, or not
    published yet) takes the oldest queued workflow from `rows`, the repository's own queue
    (the INSERTED rows, `SKIP LOCKED`, concurrent consumes in one transaction): so a
    workflow is consumable from its commit on, published or not, and a `204` means that
    nothing is queued. Its message, if it was published, is a duplicate that consumers
    skip; if it was not, the relay deletes its entry instead of publishing it.

    The same holds while the broker is away: a consume whose get fails takes from the rows
    instead of failing, and for `BROKER_RETRY_AFTER` seconds the consumes do not ask the
    broker at all; nor while a get or the connection's opening has waited more than
    `BROKER_STALLED_AFTER` (a broker that hangs rather than refuses). Only the database
    being away makes a consume fail."""

    def __init__(
        self,
        repository: WorkflowRepository,
        broker: RabbitMqBroker,
        relay: OutboxRelay,
        rows: WorkflowQueue,
        *,
        wait_for_confirm: bool = False,
    ) -> None:
        self._repository = repository
        self._broker = broker
        self._relay = relay
        self._rows = rows
        self._wait_for_confirm = wait_for_confirm
        # The broker's last answer was "empty", and the get on its way, if any: while both
        # hold, a consume waits for that get's answer rather than asking too.
        self._found_empty = False
        self._asking: asyncio.Future[bool] | None = None
        self._away_until = 0.0  # monotonic: till then, consumes do not ask the broker
        self._away = False  # the broker failed a get and has not answered one since

    async def enqueued(self, workflow: Workflow) -> None:
        if not self._wait_for_confirm:
            self._relay.hand_over(workflow.uuid)
        elif not await self._relay.publish(workflow.uuid):
            log.info("workflow %s not confirmed yet: the outbox keeps it", workflow.uuid)

    async def consume(self, handle: ClaimHandler, now: datetime) -> Workflow | None:
        claimed = await self._from_broker(handle, now)
        if claimed is not None:
            return claimed
        # Nothing from the broker: the oldest queued row no other consume holds. One
        # claim for the consumes that get here together (bench/notes.md, session 21).
        return await self._rows.consume(handle, now)

    async def _get(self) -> Delivery | None:
        """The broker's next message, or None. When its queue was empty at the last answer,
        the consumes that ask while a get is on its way share that get's answer if it is
        empty again: when consumers keep up, the waiters one commit wakes would otherwise
        each ask the broker for the same nothing (a quorum queue's command each). A
        workflow whose message came in meanwhile is in the database's rows, where such a
        consume looks next."""
        while self._found_empty and (asking := self._asking) is not None:
            if await asyncio.shield(asking):
                return None
        if time.monotonic() < self._away_until or self._broker.stalled(BROKER_STALLED_AFTER):
            return None  # the broker failed a get just now, or is slow to answer: the rows
        self._asking = asking = asyncio.get_running_loop().create_future()
        empty = False
        try:
            delivery = await self._broker.get()
            empty = delivery is None
        except DependencyUnavailable as error:
            self._away_until = time.monotonic() + BROKER_RETRY_AFTER
            if not self._away:
                self._away = True
                log.warning(
                    "the broker is unavailable (%s): consumes take from the database", error
                )
            return None
        finally:
            self._found_empty = empty
            if self._asking is asking:
                self._asking = None
            asking.set_result(empty)
        if self._away:
            self._away = False
            log.info("the broker answers again: consumes take its messages")
        return delivery

    async def _from_broker(self, handle: ClaimHandler, now: datetime) -> Workflow | None:
        while (delivery := await self._get()) is not None:
            uuid = _parse_uuid(delivery.body)
            if uuid is None:
                log.error("dropping a malformed message from the queue: %r", delivery.body)
                self._broker.ack(delivery)
                continue
            try:
                claimed = await self._repository.claim(uuid, handle, now)
            except (DependencyUnavailable, ClaimerGone, asyncio.CancelledError):
                # Not the workflow's fault (the export directory full, the database away,
                # the caller gone): a message handed back counts towards the quorum queue's
                # delivery limit, and ten such 503s would dead-letter a healthy workflow.
                # Its row is the truth and stays queued: consumes take it from the rows.
                self._broker.ack(delivery)
                raise
            except BaseException:
                self._broker.requeue(delivery)  # counted: the workflow's own failure
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

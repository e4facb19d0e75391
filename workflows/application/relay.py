"""The outbox relay: moves committed outbox entries to the broker, never losing one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from uuid import UUID

import attrs

from workflows.application.doorbell import Doorbell
from workflows.application.ports import MessagePublisher, Outbox, OutboxEntry
from workflows.domain.errors import DependencyUnavailable

log = logging.getLogger(__name__)


@attrs.define
class OutboxRelay:
    """Publishes outbox entries and deletes each only after the broker confirms it.

    A request that has just committed an entry awaits `publish(uuid)`, which returns once
    that message is confirmed (True) or after `confirm_timeout` (False): the entry then
    stays in the outbox and a later flush delivers it. `run()` flushes whenever a request
    asks and every `sweep_interval` seconds, which also picks up entries older than
    `stale_after` seconds left by other processes, crashes or a broker outage.
    """

    outbox: Outbox
    publisher: MessagePublisher
    confirm_timeout: float = 2.0
    sweep_interval: float = 1.0
    stale_after: float = 2.0
    batch_limit: int = 500
    outage_backoff: float = 1.0
    doorbell: Doorbell | None = None
    _waiters: dict[UUID, list[asyncio.Future[None]]] = attrs.field(factory=dict, init=False)
    _wake: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _down_until: float = attrs.field(default=0.0, init=False)

    async def publish(self, uuid: UUID) -> bool:
        if time.monotonic() < self._down_until:
            return False
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(uuid, []).append(future)
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(future), self.confirm_timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._forget(uuid, future)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.sweep_interval)
            self._wake.clear()
            try:
                while await self.flush() >= self.batch_limit:
                    pass
            except Exception:
                log.exception("outbox relay flush failed; retrying in %ss", self.sweep_interval)

    async def flush(self) -> int:
        """Publish one batch; the number of entries delivered."""
        entries: list[OutboxEntry] = []
        try:
            async with self.outbox.claim(
                list(self._waiters), stale_after=self.stale_after, limit=self.batch_limit
            ) as entries:
                if entries:
                    await self.publisher.publish([entry.workflow_uuid for entry in entries])
        except DependencyUnavailable as error:
            self._down_until = time.monotonic() + self.outage_backoff
            log.warning("outbox relay could not deliver %d entries: %s", len(entries), error)
            return 0
        if entries and self.doorbell is not None:
            self.doorbell.ring()
        for entry in entries:
            for future in self._waiters.get(entry.workflow_uuid, ()):
                if not future.done():
                    future.set_result(None)
        return len(entries)

    def _forget(self, uuid: UUID, future: asyncio.Future[None]) -> None:
        futures = self._waiters.get(uuid, [])
        if future in futures:
            futures.remove(future)
        if not futures:
            self._waiters.pop(uuid, None)

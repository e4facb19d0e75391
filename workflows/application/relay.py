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

    A request that has just committed an entry either hands it over (`hand_over(uuid)`)
    and answers at once, or awaits `publish(uuid)`, which returns once that message is
    confirmed (True) or after `confirm_timeout` (False): the entry then stays in the
    outbox and a later sweep delivers it. `run()` flushes whenever a request asks: the
    entries handed over and those of the requests waiting in this process are published
    at once, without being claimed (no other relay takes an entry before it is `stale_after`
    seconds old), and deleted once confirmed. Every `sweep_interval` seconds, under load
    too, a sweep claims (locks) entries older than `stale_after` seconds, left by other
    processes, crashes or a broker outage, and publishes them. A flush takes up to
    `batch_limit` entries and the broker confirms them together; up to `parallel` flushes
    run at once, each with the requests that arrived since the others began, and a
    backlog is swept batch after batch until it is gone.

    Every path may publish an entry twice (a crash or failed deletion after the confirm,
    a confirm slower than `stale_after`): consumers skip a message whose workflow is not
    queued, so a duplicate is never consumed twice.
    """

    outbox: Outbox
    publisher: MessagePublisher
    confirm_timeout: float = 2.0
    sweep_interval: float = 1.0
    stale_after: float = 2.0
    batch_limit: int = 500
    outage_backoff: float = 1.0
    doorbell: Doorbell | None = None
    parallel: int = 3
    max_handed_over: int = 10_000
    _waiters: dict[UUID, list[asyncio.Future[None]]] = attrs.field(factory=dict, init=False)
    _flushing: set[UUID] = attrs.field(factory=set, init=False)  # taken by a flush
    _handed: dict[UUID, None] = attrs.field(factory=dict, init=False)  # hand_over, in order
    _wake: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _down_until: float = attrs.field(default=0.0, init=False)
    _next_sweep: float = attrs.field(default=0.0, init=False)

    def hand_over(self, uuid: UUID) -> None:
        """An entry that has just committed and that no request waits for: the next flush
        publishes it (within milliseconds, with the others handed over meanwhile) instead
        of a sweep after `stale_after`. While the broker is down, or while `max_handed_over`
        entries are already waiting, it is left to the sweep: the outbox keeps it."""
        if time.monotonic() < self._down_until or len(self._handed) >= self.max_handed_over:
            return
        self._handed[uuid] = None
        self._wake.set()

    async def publish(self, uuid: UUID) -> bool:
        if time.monotonic() < self._down_until:
            return False
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(uuid, []).append(future)
        self._wake.set()
        try:
            async with asyncio.timeout(self.confirm_timeout):
                await future
            return True
        except TimeoutError:
            return False
        finally:
            self._forget(uuid, future)

    async def run(self) -> None:
        """Flush whenever asked (and every `sweep_interval`): up to `parallel` flushes at
        a time, so that a request arriving while a batch is being confirmed goes in the
        next batch at once instead of waiting for the first one to finish."""
        flushing: set[asyncio.Task[None]] = set()
        try:
            while True:
                asked = False
                with contextlib.suppress(TimeoutError):
                    asked = await asyncio.wait_for(self._wake.wait(), self.sweep_interval)
                self._wake.clear()
                if len(flushing) >= self.parallel:
                    await asyncio.wait(flushing, return_when=asyncio.FIRST_COMPLETED)
                sweep = not asked or time.monotonic() >= self._next_sweep
                if sweep:
                    self._next_sweep = time.monotonic() + self.sweep_interval
                flush = self._flush_backlog(sweep=sweep)
                task = asyncio.create_task(flush, name="outbox-flush")
                flushing.add(task)
                task.add_done_callback(flushing.discard)
        finally:
            for task in flushing:
                task.cancel()
            await asyncio.gather(*flushing, return_exceptions=True)

    async def _flush_backlog(self, *, sweep: bool) -> None:
        try:
            if await self.flush(sweep=sweep) >= self.batch_limit:
                while await self.flush() >= self.batch_limit:
                    pass
        except Exception:
            log.exception("outbox relay flush failed; retrying in %ss", self.sweep_interval)

    async def flush(self, *, sweep: bool = True) -> int:
        """Publish the entries of the requests waiting (that no other flush has taken, up
        to `batch_limit`) and, with `sweep`, a batch of stale entries; the number the
        broker confirmed.

        The requests waiting for those entries are answered as soon as the broker has
        confirmed them, before their deletion commits: the message is safe in the
        broker by then, and a deletion that fails only leaves entries that a later sweep
        publishes again, duplicates that consumers skip."""
        wanted = [
            uuid
            for uuid, futures in self._waiters.items()
            if uuid not in self._flushing and not all(future.done() for future in futures)
        ]
        while self._handed and len(wanted) < self.batch_limit:
            uuid = next(iter(self._handed))
            del self._handed[uuid]
            if uuid not in self._flushing and uuid not in self._waiters:
                wanted.append(uuid)
        if len(wanted) > self.batch_limit or self._handed:
            wanted = wanted[: self.batch_limit]
            self._wake.set()  # the rest go in the next flush
        confirmed = await self._publish_waiting(wanted) if wanted else 0
        if sweep:
            confirmed += await self._sweep()
        return confirmed

    async def _publish_waiting(self, uuids: list[UUID]) -> int:
        self._flushing.update(uuids)
        try:
            await self.publisher.publish(uuids)
        except DependencyUnavailable as error:
            self._down_until = time.monotonic() + self.outage_backoff
            log.warning("outbox relay: %d entries not confirmed: %s", len(uuids), error)
            return 0
        finally:
            self._flushing.difference_update(uuids)
        self._confirmed(uuids)
        try:
            await self.outbox.delete(uuids)
        except DependencyUnavailable as error:
            log.warning("outbox relay: %d confirmed entries not deleted: %s", len(uuids), error)
        return len(uuids)

    async def _sweep(self) -> int:
        """Claim stale entries (up to `batch_limit`), publish them, delete them."""
        entries: list[OutboxEntry] = []
        confirmed = 0
        try:
            async with self.outbox.claim(
                [], stale_after=self.stale_after, limit=self.batch_limit
            ) as entries:
                uuids = [entry.workflow_uuid for entry in entries]
                self._flushing.update(uuids)
                if uuids:
                    await self.publisher.publish(uuids)
                    confirmed = len(uuids)
                    self._confirmed(uuids)
        except DependencyUnavailable as error:
            self._down_until = time.monotonic() + self.outage_backoff
            log.warning(
                "outbox relay: %d entries, %d confirmed, not deleted: %s",
                len(entries),
                confirmed,
                error,
            )
            return confirmed
        finally:
            self._flushing.difference_update(entry.workflow_uuid for entry in entries)
        return confirmed

    def _confirmed(self, uuids: list[UUID]) -> None:
        if self.doorbell is not None:
            self.doorbell.ring()
        for uuid in uuids:
            for future in self._waiters.get(uuid, ()):
                if not future.done():
                    future.set_result(None)

    def _forget(self, uuid: UUID, future: asyncio.Future[None]) -> None:
        futures = self._waiters.get(uuid, [])
        if future in futures:
            futures.remove(future)
        if not futures:
            self._waiters.pop(uuid, None)

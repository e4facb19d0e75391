"""The outbox relay: moves committed outbox entries to the broker, never losing one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from uuid import UUID

import attrs

from workflows.application.doorbell import Doorbell
from workflows.application.outages import Outage
from workflows.application.ports import MessagePublisher, Outbox, OutboxEntry
from workflows.domain.errors import DependencyUnavailable

log = logging.getLogger(__name__)

HAND_OVER_DELAY = 0.02
"""Seconds a handed-over entry waits before it is published: the time a consume woken by
its commit has to take the workflow from the database first, which spares the broker a
message and a consume its skip (bench/notes.md, session 21)."""


@attrs.define
class OutboxRelay:
    """Publishes outbox entries and deletes each only after the broker confirms it.

    A request that has just committed an entry either hands it over (`hand_over(uuid)`)
    and answers at once, or awaits `publish(uuid)`, which returns once that message is
    confirmed (True) or after `confirm_timeout` (False): the entry then stays in the
    outbox and a later sweep delivers it. `run()` flushes whenever a request asks: the
    entries of the requests waiting in this process are published at once, and those
    handed over once they are `hand_over_delay` seconds old, without being claimed (no
    other relay takes an entry before it is `stale_after` seconds old), and deleted once
    confirmed. A handed-over entry whose workflow is no longer queued by then (a consume
    took it from the database, as consumes do when the broker has nothing for them) is
    deleted unpublished (`Outbox.discard_unqueued`): its message would only be skipped.
    When consumers keep up, that is nearly every entry. Every `sweep_interval` seconds, under load
    too, a sweep claims (locks) entries older than `stale_after` seconds, left by other
    processes, crashes or a broker outage, and publishes them. A flush takes up to
    `batch_limit` entries and the broker confirms them together; up to `parallel` flushes
    run at once, each with the requests that arrived since the others began, and a
    backlog is swept batch after batch until it is gone. Stopped (`run()` cancelled), it
    lets the flushes on their way finish and publishes every entry still handed over, due
    or not, within `stop_within` seconds.

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
    hand_over_delay: float = HAND_OVER_DELAY
    stop_within: float = 2.0
    _waiters: dict[UUID, list[asyncio.Future[None]]] = attrs.field(factory=dict, init=False)
    _flushing: set[UUID] = attrs.field(factory=set, init=False)  # taken by a flush
    # Retried at every flush and sweep while the broker is away or blocks publishing:
    # logged when it starts and when it is over, not at each try.
    _unconfirmed: Outage = attrs.field(
        init=False,
        factory=lambda: Outage(
            log,
            "outbox relay: entries not confirmed, retrying: %s",
            "outbox relay: confirmed again",
        ),
    )
    # hand_over's entries, in order, with the time each was handed over (time.monotonic)
    _handed: dict[UUID, float] = attrs.field(factory=dict, init=False)
    # No flush takes handed-over entries before then: they go in batches, not one by one.
    _handed_not_before: float = attrs.field(default=0.0, init=False)
    _wake: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _down_until: float = attrs.field(default=0.0, init=False)
    _next_sweep: float = attrs.field(default=0.0, init=False)

    def hand_over(self, uuid: UUID) -> None:
        """An entry that has just committed and that no request waits for: a flush publishes
        it `hand_over_delay` seconds later (with the others handed over meanwhile) instead
        of a sweep after `stale_after`. While the broker is down, or while `max_handed_over`
        entries are already waiting, it is left to the sweep: the outbox keeps it."""
        handed_at = time.monotonic()
        if handed_at < self._down_until or len(self._handed) >= self.max_handed_over:
            return
        self._handed[uuid] = handed_at
        if len(self._handed) == 1:
            self._wake.set()  # the loop times its next flush by the oldest entry

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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._until_next_flush())
                self._wake.clear()
                now = time.monotonic()
                sweep = now >= self._next_sweep
                if not sweep and not self._waiting() and not self._handed_due(now):
                    continue  # woken by the first entry handed over: not due yet
                if len(flushing) >= self.parallel:
                    await asyncio.wait(flushing, return_when=asyncio.FIRST_COMPLETED)
                if sweep:
                    self._next_sweep = time.monotonic() + self.sweep_interval
                flush = self._flush_backlog(sweep=sweep)
                task = asyncio.create_task(flush, name="outbox-flush")
                flushing.add(task)
                task.add_done_callback(flushing.discard)
        finally:
            await self._stop(flushing)

    async def _stop(self, flushing: set[asyncio.Task[None]]) -> None:
        """When `run()` is cancelled (the process stops): the flushes on their way finish,
        then the entries still handed over are published, due or not, rather than left
        to another process's sweep `stale_after` seconds later. All within
        `stop_within` seconds: what is left then stays in the outbox, for a sweep."""
        try:
            async with asyncio.timeout(self.stop_within):
                if flushing:
                    await asyncio.wait(flushing)
                while self._handed and time.monotonic() >= self._down_until:
                    await self.flush(sweep=False, handed_all=True)
        except TimeoutError:
            log.warning("outbox relay stopped with entries unconfirmed: a sweep delivers them")
        except Exception:
            log.exception("outbox relay: the last flush failed; a sweep delivers its entries")
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

    async def flush(self, *, sweep: bool = True, handed_all: bool = False) -> int:
        """Publish the entries of the requests waiting (that no other flush has taken, up
        to `batch_limit`), those handed over that are due (all of them with `handed_all`)
        and, with `sweep`, a batch of stale entries; the number the broker confirmed.

        The requests waiting for those entries are answered as soon as the broker has
        confirmed them, before their deletion commits: the message is safe in the
        broker by then, and a deletion that fails only leaves entries that a later sweep
        publishes again, duplicates that consumers skip."""
        wanted = self._waiting()
        handed: list[UUID] = []
        now = time.monotonic()
        if self._handed_due(now):
            # Half a delay until the next such flush: each takes what is due by then.
            self._handed_not_before = now + self.hand_over_delay / 2
        due = now if handed_all else now - self.hand_over_delay
        while self._handed and len(wanted) + len(handed) < self.batch_limit:
            uuid, handed_at = next(iter(self._handed.items()))
            if handed_at > due:
                break  # neither is any younger one; the loop wakes when it is due
            del self._handed[uuid]
            if uuid not in self._flushing and uuid not in self._waiters:
                handed.append(uuid)
        left_due = bool(self._handed) and next(iter(self._handed.values())) <= due
        if len(wanted) + len(handed) > self.batch_limit or left_due:
            wanted = wanted[: self.batch_limit]
            handed = handed[: self.batch_limit - len(wanted)]
            self._wake.set()  # the rest go in the next flush
        confirmed = await self._publish_waiting(wanted, handed) if wanted or handed else 0
        if sweep:
            confirmed += await self._sweep()
        return confirmed

    def _waiting(self) -> list[UUID]:
        """The workflows that requests of this process wait for and no flush has taken."""
        return [
            uuid
            for uuid, futures in self._waiters.items()
            if uuid not in self._flushing and not all(future.done() for future in futures)
        ]

    def _handed_due(self, now: float) -> bool:
        """Whether a flush at `now` would take handed-over entries: the oldest is at least
        `hand_over_delay` old, and the last flush that took some was half a delay ago or
        more."""
        if not self._handed or now < self._handed_not_before:
            return False
        return next(iter(self._handed.values())) <= now - self.hand_over_delay

    def _until_next_flush(self) -> float:
        """Seconds until the next sweep, or until a flush would take handed-over entries."""
        now = time.monotonic()
        until = self._next_sweep - now
        if self._handed:
            oldest = next(iter(self._handed.values()))
            due = max(oldest + self.hand_over_delay, self._handed_not_before)
            until = min(until, due - now)
        return max(until, 0.0)

    async def _publish_waiting(self, wanted: list[UUID], handed: list[UUID]) -> int:
        """Publish the entries requests wait for, and those handed over whose workflows are
        still queued; delete them once confirmed. The others' entries are deleted unpublished
        (`discard_unqueued`): their workflows were consumed from the database."""
        taken = wanted + handed
        self._flushing.update(taken)
        try:
            uuids = wanted
            if handed:
                uuids = wanted + await self._still_queued(handed)
                if not uuids:
                    return 0
            await self.publisher.publish(uuids)
        except DependencyUnavailable as error:
            self._down_until = time.monotonic() + self.outage_backoff
            self._unconfirmed.failed(error)
            return 0
        finally:
            self._flushing.difference_update(taken)
        self._unconfirmed.passed()
        self._confirmed(uuids)
        try:
            await self.outbox.delete(uuids)
        except DependencyUnavailable as error:
            log.warning("outbox relay: %d confirmed entries not deleted: %s", len(uuids), error)
        return len(uuids)

    async def _still_queued(self, handed: list[UUID]) -> list[UUID]:
        """Those of `handed` whose workflows are still queued, after deleting the others'
        entries; all of them when the database cannot say (a message too many is only
        skipped)."""
        try:
            discarded = await self.outbox.discard_unqueued(handed)
        except DependencyUnavailable as error:
            log.warning("outbox relay: %d entries not checked: %s", len(handed), error)
            return handed
        return [uuid for uuid in handed if uuid not in discarded]

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
                    try:
                        await self.publisher.publish(uuids)
                    except DependencyUnavailable as error:
                        self._unconfirmed.failed(error)
                        raise
                    self._unconfirmed.passed()
                    confirmed = len(uuids)
                    self._confirmed(uuids)
        except DependencyUnavailable as error:
            self._down_until = time.monotonic() + self.outage_backoff
            if confirmed:  # the database failed the deletion (a failed publish is logged)
                log.warning(
                    "outbox relay: %d entries, %d confirmed, not deleted: %s",
                    len(entries),
                    confirmed,
                    error,
                )
            elif not self._unconfirmed.ongoing:  # the claim itself failed: the database
                log.warning("outbox relay: sweep failed: %s", error)
            return confirmed
        finally:
            self._flushing.difference_update(entry.workflow_uuid for entry in entries)
        return confirmed

    def _confirmed(self, uuids: list[UUID]) -> None:
        if self.doorbell is not None:
            self.doorbell.ring(len(uuids))
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

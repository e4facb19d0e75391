"""A doorbell across processes: LISTEN/NOTIFY on one channel."""

from __future__ import annotations

import asyncio
import logging
import time
from uuid import uuid4

import psycopg
from psycopg.conninfo import make_conninfo

from workflows.adapters.postgres.database import (
    CONNECT_TIMEOUT,
    BoundedConnection,
    Pool,
    connection,
    keepalives,
)
from workflows.application.doorbell import Doorbell
from workflows.application.outages import Outage
from workflows.domain.errors import DependencyUnavailable

log = logging.getLogger(__name__)

CHANNEL = "workflows_ready"
# The payload: the sender's token, a space, how many workflows it rang for.
NOTIFY = f"SELECT pg_notify('{CHANNEL}', %s)"
LISTEN = f"LISTEN {CHANNEL}"
NOTIFY_EVERY = 0.005
"""Seconds between two NOTIFYs of one process at most: a burst of POSTs costs one NOTIFY
per interval, not one per round trip (a waiter elsewhere wakes at most this much later)."""
HEARTBEAT = 15.0
"""Every this many seconds the listener asks its connection a `SELECT 1`: a
connection that died without a word (a NAT or firewall that forgot it, a network
partition) fails that within the query timeout and is replaced, where it would otherwise
never hear a NOTIFY again. The traffic also keeps such middleboxes from forgetting it."""


class PostgresDoorbell(Doorbell):
    """Each process listens on one connection of its own; a ring wakes local waiters at
    once and sends a NOTIFY for the others, which says how many workflows it rang for: a
    listener wakes as many of its waiters (all of them for a NOTIFY that does not say). A
    process ignores its own NOTIFYs: its waiters were woken already. Rings that come while
    a NOTIFY is on its way, or within NOTIFY_EVERY of the last one, share the next one, their
    counts added. After the listening connection is lost and regained, local waiters are
    woken to look again."""

    def __init__(self, url: str, pool: Pool) -> None:
        super().__init__()
        self._url = url
        self._pool = pool
        self._listener: asyncio.Task[None] | None = None
        self._pending_notify = False
        self._announced = 0  # workflows rung for since the last NOTIFY went
        self._last_notify = 0.0
        self._token = uuid4().hex  # this process's NOTIFYs
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="doorbell-listener")

    async def stop(self) -> None:
        self.close()
        tasks = [*self._tasks, *([self._listener] if self._listener else [])]
        self._listener = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def announce(self, count: int) -> None:
        if self._listener is None:
            return
        self._announced += count
        if self._pending_notify:
            return
        self._pending_notify = True
        task = asyncio.get_running_loop().create_task(self._notify())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _notify(self) -> None:
        try:
            await asyncio.sleep(self._last_notify + NOTIFY_EVERY - time.monotonic())
            self._last_notify = time.monotonic()
            async with connection(self._pool) as conn:
                self._pending_notify = False  # a ring from now on needs a NOTIFY of its own
                count, self._announced = self._announced, 0
                await conn.execute(NOTIFY, (f"{self._token} {count}",))
        except DependencyUnavailable as exc:
            log.debug("doorbell could not notify other processes: %s", exc)
        finally:
            self._pending_notify = False

    async def _listen(self) -> None:
        backoff = 0.5
        # Retried every few seconds while the database is away: logged when it starts (or
        # its reason changes) and when listening again, not at each retry.
        lost = Outage(log, "doorbell listener lost its connection: %s", "doorbell listening again")
        while True:
            try:
                conninfo = make_conninfo(
                    self._url, connect_timeout=CONNECT_TIMEOUT, **keepalives(self._url)
                )
                conn = await BoundedConnection.connect(conninfo, autocommit=True)
                async with conn:
                    await conn.execute(LISTEN)
                    lost.passed()
                    self.wake_local()  # whatever rang while nobody listened
                    backoff = 0.5
                    while True:
                        async for notify in conn.notifies(timeout=HEARTBEAT):
                            self._heard(notify.payload)
                        await conn.execute("SELECT 1")  # within QUERY_TIMEOUT, or gone
            except (psycopg.Error, OSError) as exc:
                lost.failed(exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _heard(self, payload: str) -> None:
        """A NOTIFY: wake as many waiters as the other process rang for."""
        sender, _, said = payload.partition(" ")
        if sender == self._token:
            return  # this process's own: its waiters were woken when it rang
        try:
            count: int | None = int(said)
        except ValueError:
            count = None  # a sender that does not say how many: every waiter looks
        if count is not None and count < 1:
            count = None
        self.wake_local(count)

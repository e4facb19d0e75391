"""The doorbell: wakes consumers that wait for work (long-poll consume) without polling."""

from __future__ import annotations

import asyncio


class Doorbell:
    """Rings when a workflow may have become consumable, in this process at once and, in
    subclasses that `announce`, in every other process too.

    A waiter takes a `ticket()` before it looks for work, then `wait(ticket, timeout)`: a
    ring between the two is not missed. Many waiters cost nothing while nothing rings.
    """

    def __init__(self) -> None:
        self._rung = asyncio.Event()
        self._closed = False

    def ring(self) -> None:
        """Wake local waiters now and tell the other processes (non-blocking)."""
        self.wake_local()
        self.announce()

    def announce(self) -> None:
        """Tell the other processes; nothing to tell in a single-process doorbell."""

    def wake_local(self) -> None:
        rung, self._rung = self._rung, asyncio.Event()
        rung.set()

    def ticket(self) -> asyncio.Event:
        return self._rung

    async def wait(self, ticket: asyncio.Event, within: float) -> bool:
        """True when rung since `ticket` was taken (or closed), False after `within` s."""
        if self._closed:
            return True
        try:
            await asyncio.wait_for(ticket.wait(), within)
        except TimeoutError:
            return False
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """The service is stopping: wake every waiter for good."""
        self._closed = True
        self.wake_local()

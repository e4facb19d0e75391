"""The doorbell: wakes consumers that wait for work (long-poll consume) without polling."""

from __future__ import annotations

import asyncio


class Doorbell:
    """Rings when workflows may have become consumable, in this process at once and, in
    subclasses that `announce`, in every other process too.

    A waiter takes a `ticket()` before it looks for work, then `wait(ticket, timeout)`: a
    ring between the two is not missed (the wait returns at once). A ring for `count`
    workflows wakes that many waiters, the longest waiting first, not every one: a workflow
    needs one consume, and the others would only look, find nothing and wait again (with 8
    waiters, most of a worker's CPU per workflow: bench/notes.md, session 22). A waiter
    woken that cannot use its turn (its client has gone, its look failed) passes it on
    (`pass_on`). Many waiters cost nothing while nothing rings.
    """

    def __init__(self) -> None:
        self._rings = 0  # how many times it has rung: a ticket is the count when taken
        # The waiters, longest waiting first (a dict: ordered, and O(1) to leave).
        self._waiters: dict[asyncio.Future[None], None] = {}
        self._closed = False

    def ring(self, count: int = 1) -> None:
        """`count` workflows became consumable: wake as many local waiters now and tell the
        other processes (non-blocking)."""
        self.wake_local(count)
        self.announce(count)

    def announce(self, count: int) -> None:
        """Tell the other processes; nothing to tell in a single-process doorbell."""

    def wake_local(self, count: int | None = None) -> None:
        """Wake `count` local waiters (every one with None); a waiter that took its ticket
        before this and is not waiting yet will not wait."""
        self._rings += 1
        waiters = self._waiters
        while waiters and (count is None or count > 0):
            future = next(iter(waiters))
            del waiters[future]
            if not future.done():
                future.set_result(None)
                if count is not None:
                    count -= 1

    def pass_on(self) -> None:
        """A woken waiter cannot use its turn: wake the next one instead."""
        self.wake_local(1)

    def ticket(self) -> int:
        return self._rings

    async def wait(self, ticket: int, within: float) -> bool:
        """True when woken (or rung since `ticket` was taken, or closed), False after
        `within` s."""
        if self._closed or self._rings != ticket:
            return True
        future = asyncio.get_running_loop().create_future()
        self._waiters[future] = None
        try:
            async with asyncio.timeout(within):
                await future
        except TimeoutError:
            return future.done() and not future.cancelled()  # woken as time ran out: True
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.pass_on()  # woken, then cancelled before it could look
            raise
        finally:
            self._waiters.pop(future, None)
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """The service is stopping: wake every waiter for good."""
        self._closed = True
        self.wake_local()

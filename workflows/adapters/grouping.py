"""Grouping: calls that arrive while a batch is in flight share the next batch."""

from __future__ import annotations

import abc
import asyncio
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class Group(abc.ABC, Generic[In, Out]):
    """Calls that come while earlier ones are on their way to the database wait and go
    together, as one batch, in the next `run` call; each caller gets its own result.

    Nothing waits for company: a call that finds no batch in flight goes at once, so a
    lone request pays no extra latency, and under load each round trip carries every call
    that arrived during the one before. Up to `parallel` batches are in flight at a time.
    With `linger` N, a batch is taken N passes of the event loop later than it could be:
    the calls made meanwhile (requests read in those passes) join it. A pass with nothing
    else to do takes microseconds; under load it is where the other requests arrive.
    Batches run in tasks of their own: a caller that is cancelled stops waiting, and
    `run` can see that (its future is done) and leave its item out.
    """

    def __init__(self, *, max_batch: int, parallel: int, linger: int = 0) -> None:
        self._max_batch = max_batch
        self._parallel = parallel
        self._linger = linger
        self._pending: list[tuple[In, asyncio.Future[Out]]] = []
        self._running = 0
        self._runners: set[asyncio.Task[None]] = set()  # references, so none is collected

    async def call(self, item: In) -> Out:
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._running < self._parallel and not self._collecting():
            # Counted until _drain returns, not until the task's done callbacks run: a
            # call that comes between the two would otherwise wait for a runner that is
            # no longer looking.
            self._running += 1
            runner = asyncio.create_task(self._drain(), name=type(self).__name__)
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        return await future

    def _collecting(self) -> bool:
        """Whether a runner will still take the calls pending now into its batch (so no
        other runner need start for them)."""
        return False

    async def _drain(self) -> None:
        try:
            await self._drain_pending()
        finally:
            self._running -= 1

    async def _drain_pending(self) -> None:
        while self._pending:
            for _ in range(self._linger):
                await asyncio.sleep(0)
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            try:
                await self.run(batch)
            except Exception as error:  # every waiter gets it (503 for DependencyUnavailable)
                for _, future in batch:
                    settle(future, error=error)

    @abc.abstractmethod
    async def run(self, batch: list[tuple[In, asyncio.Future[Out]]]) -> None:
        """Do the batch's work and settle each future (`settle`); an exception that
        escapes settles every future still pending with it."""


def settle(
    future: asyncio.Future[Out], result: Out | None = None, *, error: BaseException | None = None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]

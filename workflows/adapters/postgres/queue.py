"""Workflows in PostgreSQL: a queue whose entries are the rows."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from workflows.adapters.postgres.batching import Claim, GroupClaim
from workflows.adapters.postgres.claims import take_oldest
from workflows.adapters.postgres.database import Pool, ping_database
from workflows.application.ports import ClaimHandler, WorkflowQueue
from workflows.domain.model import Workflow


class PostgresQueue(WorkflowQueue):
    """The INSERTED rows are the queue; consumers take the oldest one no one else holds.
    `returned(n)` hears of rows queued again because their consumes' callers left."""

    def __init__(self, pool: Pool, *, returned: Callable[[int], None] | None = None) -> None:
        self._pool = pool
        self._claims = GroupClaim(pool, take_oldest, linger=0, begin_first=True, returned=returned)

    async def enqueued(self, workflow: Workflow) -> None:
        """Nothing to do: the committed INSERTED row is already the queue entry."""

    async def consume(self, handle: ClaimHandler, now: datetime) -> Workflow | None:
        return await self._claims.call(Claim(None, handle, now))

    async def ping(self) -> None:
        await ping_database(self._pool)

"""Operating figures read from PostgreSQL: queue depth, dead letters, outbox backlog,
counts by status, the oldest consume.

Read-only, for /metrics and `workflows stats`; the use cases never need them.
"""

from __future__ import annotations

from datetime import datetime

import attrs

from workflows.adapters.postgres.database import Pool, connection, waiting_up_to
from workflows.adapters.postgres.rows import QUEUED

# Counts on workflows_status_uuid_idx and the partial workflows_dead_lettered_idx: cheap
# enough for every scrape.
QUEUE_DEPTH = f"SELECT count(*) FROM workflows WHERE {QUEUED}"
DEAD_LETTERS = "SELECT count(*) FROM workflows WHERE dead_lettered_at IS NOT NULL"
OUTBOX = """
SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM outbox
"""
# The first entry of workflows_consumed_idx: whether retention keeps up (`workflows stats`).
OLDEST_CONSUMED = "SELECT min(updated_at) FROM workflows WHERE status = 'consumed'"
# A full scan: for the CLI, not for every scrape.
BY_STATUS = "SELECT status::text, count(*) FROM workflows GROUP BY status ORDER BY status"


@attrs.frozen
class OutboxBacklog:
    entries: int
    oldest_age_seconds: float
    """0 when the outbox is empty."""


class PostgresStats:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def queue_depth(self) -> int:
        """Workflows a consume may take (INSERTED, not dead-lettered)."""
        return await self._count(QUEUE_DEPTH)

    async def dead_letters(self) -> int:
        return await self._count(DEAD_LETTERS)

    async def _count(self, query: str) -> int:
        async with connection(self._pool) as conn:
            row = await (await conn.execute(query)).fetchone()
        assert row is not None, "count(*) returns one row"
        count: int = row[0]
        return count

    async def outbox(self) -> OutboxBacklog:
        async with connection(self._pool) as conn:
            row = await (await conn.execute(OUTBOX)).fetchone()
        assert row is not None, "an aggregate returns one row"
        return OutboxBacklog(entries=row[0], oldest_age_seconds=max(0.0, row[1]))

    async def oldest_consumed(self) -> datetime | None:
        """When the workflow consumed longest ago was consumed; None when none is."""
        async with connection(self._pool) as conn:
            row = await (await conn.execute(OLDEST_CONSUMED)).fetchone()
        assert row is not None, "an aggregate returns one row"
        oldest: datetime | None = row[0]
        return oldest

    async def counts_by_status(self) -> dict[str, int]:
        """A full scan (the CLI's, run by hand): it may take longer than a statement's
        QUERY_TIMEOUT on a large table, and waits for as long as it takes."""
        async with connection(self._pool) as conn:
            with waiting_up_to(conn):
                rows = await (await conn.execute(BY_STATUS)).fetchall()
        return dict(rows)

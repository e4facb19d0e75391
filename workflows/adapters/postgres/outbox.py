"""The outbox in PostgreSQL: entries written with their workflows, deleted once delivered."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from uuid import UUID

from workflows.adapters.postgres.database import Pool, connection, transaction
from workflows.application.ports import Outbox, OutboxEntry

CLAIM = """
SELECT id, workflow_uuid FROM outbox
WHERE workflow_uuid = ANY(%s::uuid[]) OR created_at < now() - make_interval(secs => %s)
ORDER BY id
LIMIT %s
FOR UPDATE SKIP LOCKED
"""
DELETE = "DELETE FROM outbox WHERE id = ANY(%s::bigint[])"
DELETE_OF_WORKFLOWS = "DELETE FROM outbox WHERE workflow_uuid = ANY(%s::uuid[])"
SIZE = "SELECT count(*) FROM outbox"
# The entries of workflows that are no longer queued, that no one holds (a sweep's claim).
# Led by the named workflows (primary key): a plan led by the queue (NOT EXISTS … queued)
# read every queued row, 30 ms at 50,000 of them.
DISCARD_UNQUEUED = """
DELETE FROM outbox
WHERE id IN (
    SELECT outbox.id FROM workflows JOIN outbox ON outbox.workflow_uuid = workflows.uuid
    WHERE workflows.uuid = ANY(%b::uuid[])
      AND NOT (workflows.status = 'inserted' AND workflows.dead_lettered_at IS NULL)
    FOR UPDATE OF outbox SKIP LOCKED)
RETURNING workflow_uuid
"""


class PostgresOutbox(Outbox):
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def claim(
        self, uuids: Collection[UUID], *, stale_after: float, limit: int
    ) -> AsyncIterator[list[OutboxEntry]]:
        """The entries stay locked, by a transaction, until the block is left."""
        async with transaction(self._pool) as conn:
            cursor = await conn.execute(CLAIM, (list(uuids), stale_after, limit))
            entries = [OutboxEntry(id, uuid) for id, uuid in await cursor.fetchall()]
            yield entries
            if entries:
                await conn.execute(DELETE, ([entry.id for entry in entries],))

    async def delete(self, uuids: Collection[UUID]) -> None:
        async with connection(self._pool) as conn:  # autocommit: one statement, committed
            await conn.execute(DELETE_OF_WORKFLOWS, (list(uuids),))

    async def size(self) -> int:
        async with connection(self._pool) as conn:
            row = await (await conn.execute(SIZE)).fetchone()
        assert row is not None, "count(*) returns one row"
        count: int = row[0]
        return count

    async def discard_unqueued(self, uuids: Collection[UUID]) -> set[UUID]:
        async with connection(self._pool) as conn:  # autocommit: one statement, committed
            cursor = await conn.execute(DISCARD_UNQUEUED, (list(uuids),))
            return {uuid for (uuid,) in await cursor.fetchall()}

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
OLDEST = "SELECT workflow_uuid FROM outbox ORDER BY id LIMIT %s"


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

    async def unconfirmed(self, limit: int) -> list[UUID]:
        async with connection(self._pool) as conn:
            cursor = await conn.execute(OLDEST, (limit,))
            return [uuid for (uuid,) in await cursor.fetchall()]

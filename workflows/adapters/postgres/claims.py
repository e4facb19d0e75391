"""Claims: statements that lock queued rows and mark them consumed in one go, and the
batch functions GroupClaim runs them in (PostgresQueue's consume, the repository's
claim)."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from workflows.adapters.postgres.batching import Claim
from workflows.adapters.postgres.database import Connection
from workflows.adapters.postgres.rows import QUEUED, as_workflow
from workflows.domain.model import Workflow

# Claims lock the rows and mark them CONSUMED in one statement, inside the claim's
# transaction (GroupClaim); RETURNING gives each row as it was, for the handler. 'inserted'
# is a literal, not a parameter, so even a generic (prepared) plan can use the partial index
# workflows_queue_idx. Rows are locked in uuid order, so two batches that want the same
# rows cannot deadlock.
TAKE = """
UPDATE workflows
SET status = 'consumed', updated_at = %s, claim_token = %s
FROM ({}) AS taken
WHERE workflows.uuid = taken.uuid
RETURNING {}
"""
_LOCKED = (
    "uuid, status, data_text, steps, created_at, updated_at, delivery_attempts, dead_lettered_at"
)
_TAKEN = (
    "taken.uuid, taken.status, taken.data_text::text, taken.steps, taken.created_at,"
    " taken.updated_at, taken.delivery_attempts, taken.dead_lettered_at"
)
TAKE_OLDEST_INSERTED = TAKE.format(
    f"SELECT {_LOCKED} FROM workflows WHERE {QUEUED} ORDER BY uuid LIMIT %s FOR UPDATE SKIP LOCKED",
    _TAKEN,
)
TAKE_THESE_IF_QUEUED = TAKE.format(
    f"SELECT {_LOCKED} FROM workflows WHERE uuid = ANY(%b::uuid[]) AND {QUEUED}"
    " ORDER BY uuid FOR UPDATE",
    _TAKEN,
)


async def take_oldest(
    conn: Connection, claims: list[Claim], now: datetime, token: UUID
) -> list[Workflow | None]:
    """The oldest queued rows no one else holds, one per claim while they last, locked and
    marked consumed at `now` with the claim's `token` (as they were before, in uuid order)."""
    cursor = await conn.execute(TAKE_OLDEST_INSERTED, (now, token, len(claims)))
    rows = sorted(await cursor.fetchall(), key=lambda row: row[0])
    workflows: list[Workflow | None] = [as_workflow(row) for row in rows]
    return workflows + [None] * (len(claims) - len(workflows))


async def take_these(
    conn: Connection, claims: list[Claim], now: datetime, token: UUID
) -> list[Workflow | None]:
    """Each claim's row if it is queued (waiting for a concurrent holder to finish), locked
    and marked consumed at `now` with the claim's `token`; a row that two claims of the
    batch name goes to the first."""
    uuids = [claim.uuid for claim in claims]
    cursor = await conn.execute(TAKE_THESE_IF_QUEUED, (now, token, uuids))
    found = {workflow.uuid: workflow for workflow in map(as_workflow, await cursor.fetchall())}
    return [found.pop(claim.uuid, None) if claim.uuid else None for claim in claims]

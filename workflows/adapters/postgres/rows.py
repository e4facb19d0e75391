"""Workflow rows: the columns statements return, in the order one function maps them to a
Workflow, and which rows are queued."""

from __future__ import annotations

from datetime import UTC

from psycopg.rows import TupleRow

from workflows.domain.model import JsonDocument, Workflow, WorkflowStatus

COLUMNS = (
    "uuid, status::text, data_text::text, steps, created_at, updated_at,"
    " delivery_attempts, dead_lettered_at"
)
QUEUED = "status = 'inserted' AND dead_lettered_at IS NULL"

_STATUSES = {status.value: status for status in WorkflowStatus}


def as_workflow(row: TupleRow) -> Workflow:
    """A row as a Workflow. The session's time zone is UTC (`database.session_options`), so
    `astimezone(UTC)` returns each timestamp as it is; it stays for a connection made
    otherwise. Positional arguments and a dict for the status: this runs once per row of
    a list page (bench/notes.md)."""
    uuid, status, text, steps, created_at, updated_at, attempts, dead_lettered_at = row
    return Workflow(
        uuid,
        _STATUSES[status],
        JsonDocument(text),
        tuple(steps),
        created_at.astimezone(UTC),
        updated_at.astimezone(UTC),
        attempts,
        None if dead_lettered_at is None else dead_lettered_at.astimezone(UTC),
    )

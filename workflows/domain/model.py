"""The workflow: a JSON document to export and the steps that describe it."""

from __future__ import annotations

import enum
import hashlib
import json
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import attrs


class WorkflowStatus(enum.StrEnum):
    INSERTED = "inserted"
    CONSUMED = "consumed"


@attrs.frozen
class JsonDocument:
    """A JSON object or a non-empty array of objects, kept as its exact compact text.

    Text, not parsed values, is the domain's currency: it keeps the client's key
    order and every number's exact value, which JSONB and floats would not.
    """

    text: str

    @property
    def size(self) -> int:
        """The text's length in UTF-8 bytes, as PostgreSQL's `octet_length` counts it."""
        text = self.text
        return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))

    def parse(self) -> Any:
        """The document as Python values.

        Objects keep key order; every number is a Decimal holding its exact text value
        (ints too: Python's int parsing caps at 4300 digits and is quadratic).
        """
        return json.loads(self.text, parse_float=Decimal, parse_int=Decimal)


def steps_size(steps: tuple[str, ...]) -> int:
    """The steps' share of a list page's budget: each name's UTF-8 bytes and 3 more (its
    quotes and separator in JSON), as the `steps_size` column holds it (and as PostgreSQL
    computes it for a row stored before that column: migration 0010)."""
    return sum(len(step.encode("utf-8", "surrogatepass")) + 3 for step in steps)


@attrs.frozen
class Workflow:
    uuid: UUID
    status: WorkflowStatus
    data: JsonDocument
    steps: tuple[str, ...]
    created_at: datetime
    updated_at: datetime
    delivery_attempts: int = 0
    """Consumes of this workflow that failed (its export raised)."""
    dead_lettered_at: datetime | None = None
    """Set when failed consumes reached the limit: out of the live queue until revived."""

    @classmethod
    def new(cls, uuid: UUID, data: JsonDocument, steps: tuple[str, ...], now: datetime) -> Workflow:
        return cls(uuid, WorkflowStatus.INSERTED, data, steps, now, now)

    @property
    def queued(self) -> bool:
        """INSERTED and not dead-lettered: a consume may take it."""
        return self.status is WorkflowStatus.INSERTED and self.dead_lettered_at is None

    def with_status(self, status: WorkflowStatus, now: datetime) -> Workflow:
        """The workflow with `status`, out of the dead letters; back to INSERTED it is
        queued again with its failed attempts forgotten."""
        if status is WorkflowStatus.INSERTED:
            return attrs.evolve(
                self, status=status, updated_at=now, delivery_attempts=0, dead_lettered_at=None
            )
        return attrs.evolve(self, status=status, updated_at=now, dead_lettered_at=None)

    def with_failure(self, now: datetime, max_attempts: int) -> Workflow:
        """One more failed consume; at `max_attempts` the workflow is dead-lettered."""
        attempts = self.delivery_attempts + 1
        dead = now if attempts >= max_attempts else None
        return attrs.evolve(self, delivery_attempts=attempts, dead_lettered_at=dead, updated_at=now)


@attrs.frozen
class IdempotencyKey:
    """A client's promise that requests with this key are one and the same request.

    `fingerprint` identifies the request's content; `expires_at` is when the key may be
    used for a different request."""

    key: str
    fingerprint: str
    expires_at: datetime

    @staticmethod
    def fingerprint_of(data: JsonDocument, steps: tuple[str, ...]) -> str:
        content = json.dumps([data.text, list(steps)], ensure_ascii=False)
        return hashlib.sha256(content.encode()).hexdigest()

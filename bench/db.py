"""The benchmark's own database: created fresh, filled fast with SQL, dropped at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from workflows.domain.model import steps_size

BODY = Path(__file__).with_name("body.json")

# A prefilled workflow's uuid holds n in its last 12 hex digits, so pgbench and the wrk Lua
# scripts can name a random existing row without a list (bench/lua/common.lua, broker.py).
# Its time field (0x010000000000) is older than any real UUIDv7, so prefilled rows are
# the oldest in the queue. A schema before migration 0008 (an older tree in bench/ab.py)
# has no data_size, and one before 0010 no steps_size: there the prefill leaves them out.
PREFILL = """
INSERT INTO workflows
    (uuid, status, data_text, data_size, steps, steps_size, created_at, updated_at)
SELECT ('01000000-0000-7000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, 'inserted',
       %(data)s::json, %(size)s, %(steps)s, %(steps_size)s, now(), now()
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS n
"""
PREFILL_WITHOUT_STEPS_SIZE = PREFILL.replace("steps_size, ", "").replace("%(steps_size)s, ", "")
PREFILL_WITHOUT_SIZE = PREFILL_WITHOUT_STEPS_SIZE.replace("data_size, ", "").replace(
    "%(size)s, ", ""
)
HAS_COLUMN = """
SELECT EXISTS (
    SELECT FROM information_schema.columns
    WHERE table_name = 'workflows' AND column_name = %(name)s
)
"""


def body() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(BODY.read_text())
    return document


def data_text() -> str:
    """The benchmark document as the service stores it: the client's text, verbatim (body.json
    is compact already; re-encoding would turn `4673.00` into `4673.0`)."""
    text = BODY.read_text()
    start = text.index(":", text.index('"data"')) + 1
    _, end = json.JSONDecoder().raw_decode(text, start)
    return text[start:end].strip()


def steps_literal() -> str:
    return "{" + ",".join(body()["steps"]) + "}"


class Database:
    def __init__(self, server_url: str, name: str) -> None:
        self.server_url = server_url
        self.name = name
        self.url = psycopg.conninfo.make_conninfo(server_url, dbname=name)

    def create(self) -> None:
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(self.name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))

    def drop(self, attempts: int = 30) -> None:
        """Drop the database, waiting (a while) for a server that is restarting."""
        statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        for attempt in range(attempts):
            try:
                with psycopg.connect(self.server_url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(statement.format(sql.Identifier(self.name)))
                return
            except psycopg.OperationalError as error:
                if attempt == attempts - 1:
                    print(f"bench: could not drop database {self.name}: {error}")
                time.sleep(1)

    def execute(self, statement: str, params: dict[str, Any] | None = None) -> list[Any]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def reset(self) -> None:
        """Empty tables, then a checkpoint, so that every run starts from the same state."""
        self.execute("TRUNCATE outbox, workflows")
        self.settle()

    def settle(self) -> None:
        self.execute("VACUUM ANALYZE workflows")
        self.execute("CHECKPOINT")

    def prefill(self, first: int, last: int) -> None:
        """Insert prefilled workflows first..last (inclusive), all inserted."""
        data = data_text()
        steps = body()["steps"]
        params = {"data": data, "size": len(data.encode()), "steps": steps}
        params |= {"steps_size": steps_size(tuple(steps)), "first": first, "last": last}
        if not self.execute(HAS_COLUMN, {"name": "data_size"})[0][0]:
            self.execute(PREFILL_WITHOUT_SIZE, params)
        elif not self.execute(HAS_COLUMN, {"name": "steps_size"})[0][0]:
            self.execute(PREFILL_WITHOUT_STEPS_SIZE, params)
        else:
            self.execute(PREFILL, params)

    def count(self, status: str | None = None) -> int:
        if status is None:
            return int(self.execute("SELECT count(*) FROM workflows")[0][0])
        query = "SELECT count(*) FROM workflows WHERE status = %(s)s"
        return int(self.execute(query, {"s": status})[0][0])

    def outbox_size(self) -> int:
        return int(self.execute("SELECT count(*) FROM outbox")[0][0])

    def started_at(self) -> str:
        """When the PostgreSQL server started: a change during a run means it restarted."""
        return str(self.execute("SELECT pg_postmaster_start_time()")[0][0])

    def version(self) -> str:
        return str(self.execute("SHOW server_version")[0][0])

    def settings(self) -> dict[str, str]:
        names = ("synchronous_commit", "fsync", "shared_buffers", "max_connections")
        return {name: str(self.execute(f"SHOW {name}")[0][0]) for name in names}

"""Schema migrations: numbered SQL files, applied in order, each exactly once."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources

import psycopg

from workflows.adapters.postgres.database import CONNECT_TIMEOUT
from workflows.domain.errors import DependencyUnavailable

MIGRATIONS = "migrations"
"""The directory of `NNNN_description.sql` files, package data of workflows.adapters."""
LOCK_KEY = 0x776F726B666C6F77
"""pg_advisory_lock key ("workflow" in ASCII) held by whoever is migrating."""

LOCK = "SELECT pg_advisory_lock(%s)"
CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
APPLIED = "SELECT version FROM schema_migrations"
RECORD = "INSERT INTO schema_migrations (version) VALUES (%s)"


def migrate(url: str) -> list[str]:
    """Apply the migrations not yet applied, each in a transaction of its own; return the
    versions (file names without `.sql`) applied now. Concurrent callers queue on an
    advisory lock, released when the connection closes, so each migration runs once."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
            conn.execute(LOCK, (LOCK_KEY,))
            conn.execute(CREATE_LEDGER)
            applied = {version for (version,) in conn.execute(APPLIED)}
            done: list[str] = []
            for version, script in _migrations():
                if version not in applied:
                    with conn.transaction():
                        conn.execute(script)  # no parameters: may hold many statements
                        conn.execute(RECORD, (version,))
                    done.append(version)
            return done
    except psycopg.OperationalError as error:
        raise DependencyUnavailable("database", str(error)) from error


def _migrations() -> Iterator[tuple[str, str]]:
    files = resources.files("workflows.adapters").joinpath(MIGRATIONS).iterdir()
    for file in sorted((f for f in files if f.name.endswith(".sql")), key=lambda f: f.name):
        yield file.name.removesuffix(".sql"), file.read_text(encoding="utf-8")

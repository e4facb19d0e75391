"""Schema migrations on a real PostgreSQL, each test on a database of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from workflows.adapters.postgres import migrate
from workflows.adapters.postgres import migrations as migrations_module

pytestmark = pytest.mark.postgres


@pytest.fixture
def empty_database(postgres_server_url: str) -> Iterator[str]:
    name = f"workflows_migrate_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield psycopg.conninfo.make_conninfo(postgres_server_url, dbname=name)
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


VERSIONS = [
    "0001_init",
    "0002_idempotency_keys",
    "0003_dead_letters",
    "0004_queue_index",
    "0005_outbox_without_foreign_key",
    "0006_claim_token",
    "0007_consumed_index",
    "0008_data_size",
    "0009_idempotency_key_owner_index",
    "0010_steps_size",
]


def recorded_versions(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    return [version for (version,) in rows]


def table_exists(url: str, name: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])


def test_migrate_creates_the_schema_and_records_each_version(empty_database: str) -> None:
    assert migrate(empty_database) == VERSIONS
    assert recorded_versions(empty_database) == VERSIONS
    assert table_exists(empty_database, "workflows")
    assert table_exists(empty_database, "outbox")


def test_the_outbox_keeps_no_foreign_key(empty_database: str) -> None:
    # 0005 dropped it: it checked nothing that can fail, at a cost on every POST.
    migrate(empty_database)
    with psycopg.connect(empty_database) as conn:
        rows = conn.execute(
            "SELECT contype FROM pg_constraint WHERE conrelid = 'outbox'::regclass"
        ).fetchall()
    assert sorted(kind for (kind,) in rows) == ["p"]


def test_migrate_again_applies_nothing_and_keeps_the_data(empty_database: str) -> None:
    migrate(empty_database)
    with psycopg.connect(empty_database) as conn:
        conn.execute(
            "INSERT INTO workflows (uuid, status, data_text, created_at, updated_at)"
            " VALUES (gen_random_uuid(), 'inserted', '{}', now(), now())"
        )
    assert migrate(empty_database) == []
    assert recorded_versions(empty_database) == VERSIONS
    with psycopg.connect(empty_database) as conn:
        assert conn.execute("SELECT count(*) FROM workflows").fetchone() == (1,)


def test_concurrent_migrators_apply_each_version_exactly_once(empty_database: str) -> None:
    start = threading.Barrier(4)

    def migrator() -> list[str]:
        start.wait()
        return migrate(empty_database)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: migrator(), range(4)))
    assert sorted(results) == [[], [], [], VERSIONS]
    assert recorded_versions(empty_database) == VERSIONS


def test_failed_migration_rolls_back_whole_and_unrecorded(
    empty_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = list(migrations_module._migrations())
    broken = ("9001_broken", "CREATE TABLE half_done (id int); SELECT no_such_function();")
    monkeypatch.setattr(migrations_module, "_migrations", lambda: iter([*real, broken]))

    with pytest.raises(psycopg.errors.UndefinedFunction):
        migrate(empty_database)
    assert recorded_versions(empty_database) == VERSIONS
    assert not table_exists(empty_database, "half_done")

    fixed = ("9001_fixed", "CREATE TABLE half_done (id int);")
    monkeypatch.setattr(migrations_module, "_migrations", lambda: iter([*real, fixed]))
    assert migrate(empty_database) == ["9001_fixed"]
    assert table_exists(empty_database, "half_done")


def test_serve_stopped_while_it_waits_to_migrate_exits_at_once(
    empty_database: str, tmp_path: Path
) -> None:
    """Another process holds the migration lock; `serve`, waiting for it, gets SIGTERM. With
    no handler of its own until uvicorn's, as PID 1 in a container it ignored the signal and
    `docker stop` waited for its SIGKILL; it now stops, status 143, and serves nothing."""
    env = {
        **os.environ,
        "DATABASE_URL": empty_database,
        "QUEUE_BACKEND": "postgres",
        "EXPORT_DIR": str(tmp_path / "exports"),
        "PORT": "0",
        "LOG_FORMAT": "text",
    }
    with psycopg.connect(empty_database, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (migrations_module.LOCK_KEY,))
        serve = subprocess.Popen(
            [sys.executable, "-m", "workflows", "serve"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            deadline = time.monotonic() + 30
            while holder.execute(waiting).fetchone() != (1,):  # it waits for the lock
                assert time.monotonic() < deadline, "serve never asked for the lock"
                time.sleep(0.05)
            serve.send_signal(signal.SIGTERM)
            said, _ = serve.communicate(timeout=10)
        finally:
            serve.kill()
    assert serve.returncode == 143, said
    assert "stopped by signal 15 before serving" in said
    assert "Uvicorn running" not in said

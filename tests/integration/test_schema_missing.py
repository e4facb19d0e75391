"""A database that answers without the service's schema (dropped and made anew, or
pointed at before `workflows migrate`): /readyz says so, and /metrics still answers."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from workflows.entrypoints import cli, observability
from workflows.entrypoints.container import Container


def rename(database_url: str, old: str, new: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {old} RENAME TO {new}")


async def test_without_its_table_readyz_is_not_ready_and_metrics_leave_its_figures_out(
    live: tuple[httpx.AsyncClient, Container],
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/readyz said ready while every request failed, and /metrics answered 500."""
    monkeypatch.setattr(observability, "SNAPSHOT_TTL", 0.0)  # each scrape reads anew
    client, _ = live
    caplog.set_level(logging.INFO)
    rename(database_url, "workflows", "workflows_away")
    try:
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "unavailable"
        for _ in range(3):
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            assert "workflows_http_requests_total" in metrics.text
            assert "workflows_dead_letters" not in metrics.text
    finally:
        rename(database_url, "workflows_away", "workflows")
    unread = [r for r in caplog.records if r.getMessage().startswith("dead letters could not")]
    assert len(unread) == 1, "logged when it starts, not at each scrape"
    assert "UndefinedTable" in unread[0].getMessage()
    assert (await client.get("/readyz")).json()["status"] in {"ready", "degraded"}
    assert "workflows_dead_letters 0.0" in (await client.get("/metrics")).text
    assert any(r.getMessage().startswith("dead letters read again") for r in caplog.records)


@pytest.fixture
def unmigrated(postgres_server_url: str) -> Iterator[str]:
    """A database of its own that was never migrated."""
    name = f"workflows_unmigrated_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield str(psycopg.conninfo.make_conninfo(postgres_server_url, dbname=name))
    finally:
        with psycopg.connect(postgres_server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.mark.parametrize(
    "command",
    [["stats"], ["stats", "--json"], ["prune", "--workflows-older-than", "1d"]],
    ids=["stats", "stats-json", "prune"],
)
def test_a_command_on_a_database_never_migrated_says_so_in_one_line(
    unmigrated: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    """`stats` printed the figures it could read, then a traceback (UndefinedTable)."""
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("DATABASE_URL", unmigrated)
    monkeypatch.setenv("QUEUE_BACKEND", "postgres")
    monkeypatch.setenv("EXPORT_DIR", str(tmp_path / "exports"))
    assert cli.main(command) == 1
    said = capsys.readouterr()
    assert said.out == ""
    lines = said.err.splitlines()
    assert lines[-1].startswith(
        "workflows: database is unavailable: its schema is missing (run `workflows migrate`)"
    )
    assert "Traceback" not in said.err

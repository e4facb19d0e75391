"""A database that answers without the service's schema (dropped and made anew, or
pointed at before `workflows migrate`): /readyz says so, and /metrics still answers."""

from __future__ import annotations

import logging

import httpx
import psycopg
import pytest

from workflows.entrypoints.container import Container


def rename(database_url: str, old: str, new: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {old} RENAME TO {new}")


async def test_without_its_table_readyz_is_not_ready_and_metrics_leave_its_figures_out(
    live: tuple[httpx.AsyncClient, Container],
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """/readyz said ready while every request failed, and /metrics answered 500."""
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

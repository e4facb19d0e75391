"""Long-poll consume across API processes: a POST on one wakes a waiter on another
(PostgreSQL LISTEN/NOTIFY), on both real backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from workflows.entrypoints.config import Settings
from workflows.entrypoints.container import Container, running
from workflows.entrypoints.http import create_app


@pytest.fixture
async def two_processes(
    backend_settings: Settings,
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two containers on the same database and queue, as two API processes would be."""
    containers = [Container(settings=backend_settings) for _ in range(2)]
    async with running(containers[0]), running(containers[1]):
        for container in containers:  # only the doorbell may wake a waiter
            container.consume_workflow().recheck_every = 3600.0
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(c)), base_url="http://t")
            for c in containers
        ]
        async with clients[0], clients[1]:
            yield clients[0], clients[1]
        if backend_settings.queue_backend == "rabbitmq":
            await containers[0].broker().delete_queue()


async def test_post_on_one_process_wakes_a_waiter_on_another(
    two_processes: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    waiter_side, poster_side = two_processes
    waiting = asyncio.create_task(waiter_side.get("/workflow/consume?wait=15"))
    await asyncio.sleep(0.5)
    assert not waiting.done()
    uuid = (await poster_side.post("/workflow", json={"data": {"a": 1}})).json()["uuid"]
    response = await asyncio.wait_for(waiting, 10)
    assert response.status_code == 200
    assert response.headers["x-workflow-uuid"] == uuid

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.openapi_check import check_response
from tests.support.threads import broker_threads
from workflows.entrypoints.config import Settings
from workflows.entrypoints.container import Container, running
from workflows.entrypoints.http import create_app


@pytest.fixture(autouse=True)
def no_thread_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test of the RabbitMQ adapter (marked `rabbitmq`) stops every connection it
    started: none of their threads outlives it."""
    yield
    if request.node.get_closest_marker("rabbitmq"):
        assert broker_threads() == []


@pytest.fixture(params=["postgres", "rabbitmq"])
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    request.getfixturevalue("pg")  # an empty schema
    rabbitmq = request.param == "rabbitmq"
    return Settings(
        database_url=request.getfixturevalue("database_url"),
        queue_backend=request.param,
        rabbitmq_url=request.getfixturevalue("rabbitmq_url") if rabbitmq else None,
        rabbitmq_queue=request.getfixturevalue("queue_name"),
        export_dir=tmp_path / "exports",
    )


@pytest.fixture
async def live(backend_settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Container]]:
    """The real app on the real services, its adapters started as in production."""
    container = Container(settings=backend_settings)
    async with running(container):
        transport = httpx.ASGITransport(app=create_app(container))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", event_hooks={"response": [check_response]}
        ) as client:
            yield client, container
        if backend_settings.queue_backend == "rabbitmq":
            await container.broker().delete_queue()

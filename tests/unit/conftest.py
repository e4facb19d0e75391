from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.openapi_check import check_response
from workflows.entrypoints.config import Settings
from workflows.entrypoints.container import Container
from workflows.entrypoints.http import create_app


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(queue_backend="memory", export_dir=tmp_path / "exports", max_body_bytes=65536)


@pytest.fixture
def container(settings: Settings) -> Container:
    return Container(settings=settings)


@pytest.fixture
async def client(container: Container) -> AsyncIterator[httpx.AsyncClient]:
    # raise_app_exceptions=False: a 500 is an answer to check, as a client would see it.
    transport = httpx.ASGITransport(app=create_app(container), raise_app_exceptions=False)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", event_hooks={"response": [check_response]}
    ) as client:
        yield client

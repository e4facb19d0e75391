"""The real app on real PostgreSQL and RabbitMQ: what a client sees, end to end."""

from __future__ import annotations

import asyncio
import csv
import io
import os
from pathlib import Path

import httpx
import pytest

from workflows.entrypoints.config import Settings
from workflows.entrypoints.container import Container, running
from workflows.entrypoints.http import create_app

Live = tuple[httpx.AsyncClient, Container]


async def test_post_get_patch_consume_round_trip(live: Live) -> None:
    client, container = live
    created = await client.post(
        "/workflow",
        json={"data": {"name": "a", "address": {"city": "Oslo"}}, "steps": ["extract"]},
    )
    assert created.status_code == 201
    uuid = created.json()["uuid"]
    assert (await client.get(f"/workflow/{uuid}")).json() == created.json()

    consumed = await client.get("/workflow/consume")
    assert consumed.status_code == 200
    assert consumed.headers["x-workflow-uuid"] == uuid
    assert consumed.content == b"name,address.city\r\na,Oslo\r\n"
    export_dir: Path = container.settings().export_dir
    assert (export_dir / f"{uuid}.csv").read_bytes() == consumed.content
    assert (await client.get(f"/workflow/{uuid}")).json()["status"] == "consumed"
    assert (await client.get("/workflow/consume")).status_code == 204

    replay = await client.patch(f"/workflow/{uuid}", json={"status": "inserted"})
    assert replay.json()["status"] == "inserted"
    again = await client.post("/v1/workflow/consume")
    assert again.headers["x-workflow-uuid"] == uuid
    assert (await client.get("/workflow/consume")).status_code == 204


async def test_exact_numbers_survive_storage_response_and_csv(live: Live) -> None:
    client, _ = live
    body = '{"data": {"big": 98765432109876543210987654321, "dec": 2.50, "tiny": 1e-30}}'
    created = await client.post(
        "/workflow", content=body, headers={"Content-Type": "application/json"}
    )
    uuid = created.json()["uuid"]
    fetched = await client.get(f"/workflow/{uuid}")
    assert '"data":{"big":98765432109876543210987654321,"dec":2.50,"tiny":1e-30}' in fetched.text
    rows = list(csv.reader(io.StringIO((await client.get("/workflow/consume")).text)))
    assert rows == [["big", "dec", "tiny"], ["98765432109876543210987654321", "2.50", "1e-30"]]


@pytest.mark.parametrize(
    ("number", "status"),
    [
        ("1" + "0" * 131071, 201),  # 131,072 digits before the point: PostgreSQL's most
        ("1" + "0" * 131072, 422),
        ("9.9e131071", 201),
        ("1e131072", 422),
        ("0." + "0" * 16382 + "1", 201),  # 16,383 after the point: PostgreSQL's most
        ("0." + "0" * 16383 + "1", 422),
        ("1e-16384", 422),
        ("0e999999", 201),  # a zero of a positive exponent is stored as 0
        ("0e1073741822", 201),  # ... up to INT_MAX / 2 - 1, numeric's own limit
        ("0e1073741823", 422),
        ("0.0e+1073741823", 422),
        ("1e0000000000000000000005", 201),  # leading zeros in an exponent count for nothing
        ("1e99999999999999999999", 422),  # an exponent Decimal cannot read
        ("-0e-99999999999999999999", 422),
        ("-0E+131072", 201),
        ("0e-16383", 201),
        ("0e-16384", 422),
    ],
    ids=lambda v: str(v) if len(str(v)) < 20 else f"{v[:6]}..({len(v)})",
)
async def test_a_number_is_refused_exactly_when_postgresql_cannot_store_it(
    live: Live, number: str, status: int
) -> None:
    client, _ = live
    body = '{"data": {"n": ' + number + "}}"
    created = await client.post(
        "/workflow", content=body, headers={"Content-Type": "application/json"}
    )
    assert created.status_code == status, created.text[:300]
    if status == 201:
        # (Python's json would refuse the 131,072-digit integer: the uuid from Location.)
        fetched = await client.get(created.headers["location"])
        assert '"data":{"n":' + number + "}" in fetched.text  # the number's text, kept


async def test_eight_concurrent_consumers_take_200_workflows_exactly_once(live: Live) -> None:
    client, _ = live
    created = await asyncio.gather(
        *(client.post("/workflow", json={"data": {"i": i}}) for i in range(200))
    )
    assert all(r.status_code == 201 for r in created)
    expected = sorted(r.json()["uuid"] for r in created)

    async def consumer() -> list[str]:
        taken = []
        while (response := await client.get("/workflow/consume")).status_code == 200:
            taken.append(response.headers["x-workflow-uuid"])
        assert response.status_code == 204
        return taken

    batches = await asyncio.gather(*(consumer() for _ in range(8)))
    taken = [uuid for batch in batches for uuid in batch]
    assert sorted(taken) == expected
    listing = await client.get("/workflow?status=inserted")
    assert listing.json() == []


async def test_readiness_reports_both_dependencies(live: Live) -> None:
    client, _ = live
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "queue": "ok", "exports": "ok"}


async def test_concurrent_duplicates_with_one_idempotency_key_create_one_workflow(
    live: Live,
) -> None:
    client, _ = live
    headers = {"Idempotency-Key": "burst-1"}
    responses = await asyncio.gather(
        *(client.post("/workflow", json={"data": {"x": 1}}, headers=headers) for _ in range(10))
    )
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["uuid"] for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 9
    assert len((await client.get("/workflow")).json()) == 1
    assert (await client.get("/workflow/consume")).status_code == 200
    assert (await client.get("/workflow/consume")).status_code == 204


async def test_consumes_link_in_files_opened_ahead_which_stopping_closes(
    backend_settings: Settings,
) -> None:
    container = Container(settings=backend_settings)
    async with running(container):
        transport = httpx.ASGITransport(app=create_app(container))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for n in range(3):
                await client.post("/workflow", json={"data": {"n": n}})
            bodies = [(await client.get("/workflow/consume")).content for _ in range(3)]
            spares = container.exporter()._spares
            assert spares is not None
            for _ in range(500):
                if spares.ready >= 16:
                    break
                await asyncio.sleep(0.01)
            assert spares.ready >= 16
            assert spares.filling
        if backend_settings.queue_backend == "rabbitmq":
            await container.broker().delete_queue()
    assert bodies == [b"n\r\n0\r\n", b"n\r\n1\r\n", b"n\r\n2\r\n"]
    assert (spares.ready, spares.filling) == (0, False)
    assert len(os.listdir(backend_settings.export_dir)) == 4  # 3 files, .flushed: no spare

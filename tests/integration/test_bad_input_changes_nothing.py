"""The bad-input matrix on the real backends: every row is a 4xx problem, and afterwards
the database (workflows, outbox, idempotency keys) and the queue are exactly as before."""

from __future__ import annotations

import gzip

import httpx
import psycopg
import pytest

from workflows.entrypoints.container import Container

Live = tuple[httpx.AsyncClient, Container]
JSON = {"Content-Type": "application/json"}
Headers = dict[str, str] | list[tuple[str, str]]
EXISTING = "0190b6d4-0000-7000-8000-000000000000"

BAD_REQUESTS = [
    ("malformed JSON", "POST", "/workflow", b'{"data": ', JSON, 400),
    ("invalid UTF-8", "POST", "/workflow", b'{"data": {"a": "\xff"}}', JSON, 400),
    ("empty body", "POST", "/workflow", b"", JSON, 400),
    (
        "form data",
        "POST",
        "/workflow",
        b"data=x",
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
    ),
    (
        "another charset",
        "POST",
        "/workflow",
        '{"data": {"a": 1}}'.encode("utf-16"),
        {"Content-Type": "application/json; charset=utf-16"},
        415,
    ),
    (
        "another charset, PATCH",
        "PATCH",
        f"/workflow/{EXISTING}",
        b'{"status": "consumed"}',
        {"Content-Type": 'application/json; charset="latin1"'},
        415,
    ),
    (
        "gzipped body",
        "POST",
        "/workflow",
        gzip.compress(b'{"data": {"a": 1}}'),
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
        415,
    ),
    (
        "gzipped body, PATCH",
        "PATCH",
        f"/workflow/{EXISTING}",
        gzip.compress(b'{"status": "consumed"}'),
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
        415,
    ),
    (
        "two Content-Type lines",
        "POST",
        "/workflow",
        b'{"data": {"a": 1}}',
        [("Content-Type", "application/json"), ("Content-Type", "text/plain")],
        400,
    ),
    (
        "two Content-Type lines, PATCH",
        "PATCH",
        f"/workflow/{EXISTING}",
        b'{"status": "consumed"}',
        [("Content-Type", "text/plain"), ("Content-Type", "application/json")],
        400,
    ),
    (
        "oversize body",
        "POST",
        "/workflow",
        b'{"data": {"a": "' + b"x" * 1_100_000 + b'"}}',
        JSON,
        413,
    ),
    (
        "too deep",
        "POST",
        "/workflow",
        b'{"data": {"a": ' + b"[" * 100 + b"]" * 100 + b"}}",
        JSON,
        422,
    ),
    ("wrong type", "POST", "/workflow", b'{"data": {"a": 1}, "steps": [1]}', JSON, 422),
    ("unknown field", "POST", "/workflow", b'{"data": {"a": 1}, "extra": 1}', JSON, 422),
    ("data a scalar", "POST", "/workflow", b'{"data": 5}', JSON, 422),
    ("data non-objects", "POST", "/workflow", b'{"data": [1, 2]}', JSON, 422),
    ("blank step", "POST", "/workflow", b'{"data": {"a": 1}, "steps": [" "]}', JSON, 422),
    (
        "CSV over 10,000,000 cells",  # 3,164 rows (the header too) of 3,163 columns
        "POST",
        "/workflow",
        b'{"data": [' + b",".join(b'{"k%d": 1}' % i for i in range(3163)) + b"]}",
        JSON,
        422,
    ),
    ("NUL byte", "POST", "/workflow", b'{"data": {"a": "\\u0000"}}', JSON, 422),
    ("number out of range", "POST", "/workflow", b'{"data": {"a": 1e999999}}', JSON, 422),
    (
        "bad idempotency key",
        "POST",
        "/workflow",
        b'{"data": {"a": 1}}',
        {**JSON, "Idempotency-Key": ""},
        422,
    ),
    ("malformed uuid", "PATCH", "/workflow/nope", b'{"status": "consumed"}', JSON, 422),
    ("unknown uuid", "PATCH", f"/workflow/{EXISTING}", b'{"status": "consumed"}', JSON, 404),
    ("unknown status", "PATCH", f"/workflow/{EXISTING}", b'{"status": "done"}', JSON, 422),
    ("bad query", "GET", "/workflow?limit=0", b"", {}, 422),
    ("bad cursor", "GET", "/workflow?after=zzz", b"", {}, 422),
    ("bad wait", "GET", "/workflow/consume?wait=99", b"", {}, 422),
    ("wrong method", "DELETE", "/workflow", b"", {}, 405),
]


async def state(container: Container) -> tuple[int, ...]:
    url = container.settings().database_url
    assert url is not None
    async with await psycopg.AsyncConnection.connect(url) as conn:
        counts = []
        for table in ("workflows", "outbox", "idempotency_keys"):
            row = await (await conn.execute(f"SELECT count(*) FROM {table}")).fetchone()
            assert row is not None
            counts.append(row[0])
    if container.settings().queue_backend == "rabbitmq":
        counts.append(await container.broker().depth())
    return tuple(counts)


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [row[1:] for row in BAD_REQUESTS],
    ids=[row[0] for row in BAD_REQUESTS],
)
async def test_bad_input_is_a_4xx_problem_and_changes_nothing(
    live: Live, method: str, path: str, body: bytes, headers: Headers, status: int
) -> None:
    client, container = live
    before = await state(container)
    response = await client.request(method, path, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert await state(container) == before
    assert (await client.get("/workflow/consume")).status_code == 204

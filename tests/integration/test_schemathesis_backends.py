"""schemathesis against a real `workflows serve` on each real backend.

tests/unit/test_schemathesis.py drives the in-memory app with many examples and the
stateful sequences; this runs the same generated requests (EXAMPLES per operation, valid
and invalid, with schemathesis' default checks: no 5xx, documented statuses, headers and
bodies, invalid input refused, valid input accepted) against uvicorn with PostgreSQL, and
with PostgreSQL and RabbitMQ, where the database's and the broker's own answers and error
paths are the ones that count. A one-off run of 500 examples per operation on each backend
found nothing.

One server serves every example of a backend, so the database outlives examples: a
generated Idempotency-Key that is valid gets a fresh unique prefix (still valid), so that
two examples never name different requests with one key. The key-reuse answer itself is
tested in test_http_idempotency.py and by the in-memory stateful run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import orjson
import pika
import pytest
import schemathesis
from hypothesis import settings

from tests.support.processes import inherited_environment, served
from tests.unit.test_schemathesis import schema, shorten_wait
from workflows.entrypoints import schemas
from workflows.entrypoints.problems import Problem

EXAMPLES = 25


@attrs.frozen
class Server:
    url: str
    log: Path


@pytest.fixture(scope="module", params=["postgres", "rabbitmq"])
def server(
    request: pytest.FixtureRequest,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    backend = request.param
    cwd = tmp_path_factory.mktemp(f"schemathesis-{backend}")
    (cwd / "tmp").mkdir()
    env = inherited_environment()
    env |= {
        "TMPDIR": str(cwd / "tmp"),
        "DATABASE_URL": database_url,
        "QUEUE_BACKEND": backend,
        "EXPORT_DIR": str(cwd / "exports"),
        "DB_POOL_SIZE": "4",
        "LOG_FORMAT": "json",
    }
    queue = f"workflows-test-{uuid.uuid4().hex[:12]}"
    if backend == "rabbitmq":
        env |= {"RABBITMQ_URL": request.getfixturevalue("rabbitmq_url"), "RABBITMQ_QUEUE": queue}
    try:
        with served(env, cwd, "server") as url:
            yield Server(url, cwd / "server.log")
    finally:
        if backend == "rabbitmq":
            connection = pika.BlockingConnection(pika.URLParameters(env["RABBITMQ_URL"]))
            connection.channel().queue_delete(queue)
            connection.channel().queue_delete(f"{queue}.dead")
            connection.close()


def unique_key(case: schemathesis.Case[Any]) -> None:
    """A valid Idempotency-Key becomes a fresh one of the same kind; an invalid one is
    sent as generated."""
    raw = case.headers.get("Idempotency-Key") if case.headers else None
    if not isinstance(raw, str):
        return
    try:
        key = schemas.parse_idempotency_key(raw)
    except Problem:
        return
    assert key is not None
    case.headers["Idempotency-Key"] = f'"{uuid.uuid4().hex}{key[:223]}"'


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None)
def test_every_operation_answers_as_documented_on_a_real_backend(
    case: schemathesis.Case[Any], server: Server
) -> None:
    shorten_wait(case)
    unique_key(case)
    case.call_and_validate(base_url=server.url, timeout=30)


def test_the_generated_requests_logged_no_error(server: Server) -> None:
    """Runs after the generated requests of its backend (same module-scoped server)."""
    records = [orjson.loads(line) for line in server.log.read_text().splitlines() if line]
    assert records, "the server logged nothing at all"
    errors = [r for r in records if r.get("level") in ("ERROR", "CRITICAL") or "exception" in r]
    assert not errors, errors[:3]

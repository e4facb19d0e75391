"""Shared fixtures: the real PostgreSQL and RabbitMQ, each test isolated.

PostgreSQL: `DATABASE_URL` names a server (any database on it); the session creates a
database of its own there and drops it at the end. Without `DATABASE_URL` an embedded
server (pgserver) is started under var/. RabbitMQ: `RABBITMQ_URL` (default the local
broker); each test declares queues of its own and deletes them afterwards.
With CI=true nothing is skipped: an unreachable service fails the run.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from psycopg import sql

from workflows.adapters.postgres import PostgresDatabase, migrate

DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(autouse=True)
def logging_left_as_found() -> Iterator[None]:
    """A command a test runs (`cli.main`, `asgi.create`) configures logging for the whole
    process, with handlers on the stdout of that moment, which pytest closes after the test
    ("I/O operation on closed file" at a later test's log line): put back what was there."""
    manager = logging.Logger.manager
    before = dict(manager.loggerDict)
    saved = [
        (logger, logger.level, logger.handlers[:], logger.propagate, logger.disabled)
        for logger in (logging.getLogger(), *before.values())
        if isinstance(logger, logging.Logger)
    ]
    yield
    for logger, level, handlers, propagate, disabled in saved:
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate, logger.disabled = propagate, disabled
    for name, made in list(manager.loggerDict.items()):
        if name not in before and isinstance(made, logging.Logger):
            made.setLevel(logging.NOTSET)  # made during the test: as a new logger is
            made.handlers.clear()
            made.propagate, made.disabled = True, False


def unavailable(what: str, error: Exception) -> None:
    message = f"{what} is not reachable: {error}"
    if IN_CI:
        pytest.fail(message + " (CI=true: services must be up, nothing is skipped)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from workflows.adapters.embedded_postgres import EmbeddedPostgres

    server = EmbeddedPostgres(os.path.join("var", "test-postgres"))
    yield server.start()


@pytest.fixture(scope="session")
def database_url(postgres_server_url: str) -> Iterator[str]:
    name = f"workflows_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(postgres_server_url, autocommit=True)
    except psycopg.OperationalError as error:
        unavailable("PostgreSQL", error)
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = str(psycopg.conninfo.make_conninfo(postgres_server_url, dbname=name))
    migrate(url)
    yield url
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[PostgresDatabase]:
    """A started pool on an empty schema."""
    database = PostgresDatabase(database_url, min_size=1, max_size=12)
    await database.start()
    async with database.pool.connection() as conn:
        await conn.execute("TRUNCATE workflows, outbox, idempotency_keys")
    yield database
    await database.stop()


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    url = os.environ.get("RABBITMQ_URL", DEFAULT_RABBITMQ_URL)
    import pika

    try:
        pika.BlockingConnection(pika.URLParameters(url)).close()
    except Exception as error:
        unavailable("RabbitMQ", error)
    return url


@pytest.fixture
def queue_name() -> Iterator[str]:
    """A fresh queue name; the queue and its dead-letter queue are deleted afterwards,
    whatever the test did with them (tests that stop their own broker clients early
    would otherwise leave them behind, a pair per run)."""
    name = f"workflows-test-{uuid.uuid4().hex[:12]}"
    yield name
    url = os.environ.get("RABBITMQ_URL", DEFAULT_RABBITMQ_URL)
    import pika

    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
    except Exception:
        return  # no broker here (a memory- or postgres-only run): nothing was declared
    try:
        for queue in (name, f"{name}.dead"):
            connection.channel().queue_delete(queue)
    finally:
        connection.close()

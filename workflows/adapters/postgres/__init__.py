"""PostgreSQL adapters: the workflow repository, a queue on its rows, and the outbox."""

from workflows.adapters.postgres.database import PostgresDatabase
from workflows.adapters.postgres.doorbell import PostgresDoorbell
from workflows.adapters.postgres.migrations import migrate
from workflows.adapters.postgres.outbox import PostgresOutbox
from workflows.adapters.postgres.queue import PostgresQueue
from workflows.adapters.postgres.workflows import PostgresWorkflowRepository

__all__ = [
    "PostgresDatabase",
    "PostgresDoorbell",
    "PostgresOutbox",
    "PostgresQueue",
    "PostgresWorkflowRepository",
    "migrate",
]

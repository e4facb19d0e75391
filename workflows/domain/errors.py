"""Errors the domain and its use cases report; the entrypoint maps them to HTTP."""

from __future__ import annotations

from uuid import UUID


class WorkflowError(Exception):
    """Base of every error this service reports on purpose."""


class WorkflowNotFound(WorkflowError):
    def __init__(self, uuid: UUID) -> None:
        super().__init__(f"no workflow with uuid {uuid}")
        self.uuid = uuid


class DependencyUnavailable(WorkflowError):
    """The database or the broker cannot be reached; the request changed nothing."""

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(f"{dependency} is unavailable: {detail}")
        self.dependency = dependency
        self.detail = detail


class ExportFailed(WorkflowError):
    """This workflow's export cannot be written for a reason of its own, not the export
    directory's (a directory stands where its file goes): a failed consume of this one
    workflow, counted towards its dead-lettering, so that it cannot hold up the queue."""


class IdempotencyKeyReused(WorkflowError):
    """An idempotency key came back with a different request than the one it first named."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"the Idempotency-Key {key!r} was already used for a different request; "
            "use a new key for a new request"
        )
        self.key = key

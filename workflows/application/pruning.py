"""`workflows prune`: what a long-running service lets go of, on the operator's word.

Consumed workflows stay in the database, and each consume's CSV in the export directory,
until an operator removes them: nothing here runs by itself. A consumed workflow is removed
with its export; an export alone can go at any age, since `GET /workflow/{uuid}/csv` renders
it again from the stored data for as long as the workflow is kept.
"""

from __future__ import annotations

from datetime import timedelta

import attrs

from workflows.application.ports import Clock, Exporter, WorkflowRepository

BATCH = 1000
"""Workflows deleted per statement: each batch is a short transaction of its own."""


@attrs.frozen
class Pruned:
    workflows: int
    """Consumed workflows deleted (with `dry_run`, that would be)."""
    their_exports: int
    """Export files of those workflows removed (0 with `dry_run`: not looked for)."""
    exports: int
    """Export files removed for their age (with `dry_run`, that would be)."""


@attrs.define
class PruneWorkflows:
    repository: WorkflowRepository
    exporter: Exporter
    clock: Clock
    batch: int = BATCH

    async def __call__(
        self,
        *,
        workflows_older_than: timedelta | None = None,
        exports_older_than: timedelta | None = None,
        dry_run: bool = False,
    ) -> Pruned:
        """Delete the workflows consumed more than `workflows_older_than` ago (their
        `updated_at`: when they were consumed, or last PATCHed to consumed) and their
        exports, batch by batch; then every export written more than `exports_older_than`
        ago. A workflow an idempotency key still names is kept until the key expires, and
        queued or dead-lettered workflows are never touched."""
        now = self.clock()
        workflows = their_exports = exports = 0
        if workflows_older_than is not None:
            before = now - workflows_older_than
            if dry_run:
                workflows = await self.repository.count_prunable(before, now)
            else:
                while True:
                    # Rows first, then their files: a crash in between leaves only files
                    # of workflows that are gone, which the age rule removes.
                    gone = await self.repository.prune_consumed(before, now, self.batch)
                    workflows += len(gone)
                    their_exports += await self.exporter.remove(gone)
                    if len(gone) < self.batch:
                        break
        if exports_older_than is not None:
            exports = await self.exporter.remove_older_than(
                now - exports_older_than, dry_run=dry_run
            )
        return Pruned(workflows, their_exports, exports)

"""Export files made durable behind the consumes, and repaired after a crash."""

from __future__ import annotations

import asyncio
import logging

import attrs

from workflows.application.outages import Outage
from workflows.application.ports import Exporter, WorkflowRepository
from workflows.domain.errors import DependencyUnavailable

log = logging.getLogger(__name__)


@attrs.define
class ExportFlusher:
    """A consume writes its export and leaves the flush to disk to this: one flush every
    `interval` seconds for every file written since the last, instead of one per file in
    the consume's own chain of waits (README, *Guarantees*).

    `run()` first recovers: after a power failure, a file written since the last flush may
    be torn (empty, or part of it), so each such file that is not what its workflow's data
    renders is rewritten. Until that is done the flush record must not move on (another
    crash would forget what is left to check), so flushing starts only then; a database
    that is down at start-up is retried every `interval` seconds. The service's start
    calls `try_recover()` before it serves, so that it is ready with the files checked.
    `close()` flushes what is left, once recovery has run."""

    repository: WorkflowRepository
    exporter: Exporter
    interval: float = 1.0
    needs_recovery: bool = True
    """False where nothing outlives the process (the memory backend): nothing to check."""
    _recovered: bool = attrs.field(init=False)
    # Retried every `interval`: a full disk or a database away would log each try.
    _postponed: Outage = attrs.field(
        init=False,
        factory=lambda: Outage(log, "export recovery postponed: %s", "export recovery ran"),
    )
    _failing: Outage = attrs.field(
        init=False,
        factory=lambda: Outage(
            log, "export flush failed, retrying: %s", "export flush works again"
        ),
    )

    @_recovered.default
    def _nothing_to_recover(self) -> bool:
        return not self.needs_recovery

    @property
    def recovered(self) -> bool:
        return self._recovered

    async def recover(self) -> int:
        """Rewrite the suspect exports that are not what their data renders; how many."""
        since = await self.exporter.unflushed_since()
        if since is None:
            return 0
        repaired = 0
        suspects = await self.exporter.suspects(await self.repository.consumed_since(since))
        for uuid in suspects:
            workflow = await self.repository.get(uuid)
            if workflow is None:
                continue
            try:
                content = await self.exporter.render(workflow)
            except ValueError:  # a poison workflow: no consume ever wrote its export
                continue
            repaired += await self.exporter.repair(workflow, content)
        return repaired

    async def try_recover(self) -> bool:
        """Recover unless done already; False (logged) when a dependency is down."""
        if not self._recovered:
            try:
                repaired = await self.recover()
            except DependencyUnavailable as exc:
                self._postponed.failed(exc)
                return False
            self._recovered = True
            self._postponed.passed()
            if repaired:
                log.warning("rewrote %d export files left torn by a crash", repaired)
        return True

    async def run(self) -> None:
        while True:
            if await self.try_recover():
                break
            await asyncio.sleep(self.interval)
        while True:
            await asyncio.sleep(self.interval)
            await self._flush()

    async def close(self) -> None:
        if self._recovered:
            await self._flush()

    async def _flush(self) -> None:
        try:
            await self.exporter.flush()
        except DependencyUnavailable as exc:
            self._failing.failed(exc)
        else:
            self._failing.passed()

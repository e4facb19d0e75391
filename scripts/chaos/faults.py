"""The scenarios: what goes wrong during the load, and when.

A fault either runs until the load stops (`continuous`), or acts on a schedule, in which
case the load goes on until the fault is over plus a tail, so that every fault happens
under load and the service is seen recovering under load too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import statistics
import subprocess
from collections import Counter
from dataclasses import dataclass

from scripts.chaos import services
from scripts.chaos.api import Target

log = logging.getLogger("chaos")


@dataclass
class Fault:
    name: str
    description: str
    continuous: bool = False
    disconnectors: bool = False  # add consume clients that drop their requests
    own_filesystem: bool = False  # each target's exports on a filesystem of its own
    audits_deletions: bool = False  # record the rows deleted from `workflows` (verify.py)

    async def inject(
        self, targets: list[Target], stop: asyncio.Event, duration: float, counts: Counter[str]
    ) -> None:
        """Act on `targets` during the load; tally what was done in `counts`."""


class Baseline(Fault):
    def __init__(self) -> None:
        super().__init__("baseline", "no fault: the control", continuous=True)


class KillWorker(Fault):
    def __init__(self, every: tuple[float, float]) -> None:
        super().__init__(
            "kill-worker",
            f"kill -9 of one uvicorn worker every {every[0]:g}-{every[1]:g} s",
            continuous=True,
        )
        self.every = every

    async def inject(
        self, targets: list[Target], stop: asyncio.Event, duration: float, counts: Counter[str]
    ) -> None:
        await asyncio.gather(*(self._kill_loop(target, stop, counts) for target in targets))

    async def _kill_loop(self, target: Target, stop: asyncio.Event, counts: Counter[str]) -> None:
        rng = random.Random()
        while not await _sleep_or_stop(stop, rng.uniform(*self.every)):
            workers = target.worker_pids()
            if len(workers) < 2:  # uvicorn has not replaced the last one yet
                continue
            victim = rng.choice(workers)
            try:
                os.kill(victim, signal.SIGKILL)
                counts[f"{target.backend} kill -9"] += 1
            except ProcessLookupError:
                pass


class RabbitOutage(Fault):
    def __init__(self, down_for: float, mode: str) -> None:
        super().__init__(
            "rabbitmq-outage",
            f"RabbitMQ stopped for {down_for:.0f} s "
            f"({'stop_app' if mode == 'app' else 'node shutdown'}), then started",
        )
        self.down_for = down_for
        self.mode = mode

    async def inject(
        self, targets: list[Target], stop: asyncio.Event, duration: float, counts: Counter[str]
    ) -> None:
        await asyncio.sleep(min(5.0, duration * 0.2))
        log.info("fault: stopping RabbitMQ (%s) for %.0f s", self.mode, self.down_for)
        try:
            await asyncio.to_thread(services.stop_rabbitmq, self.mode)
            counts["rabbitmq stops"] += 1
            await asyncio.sleep(self.down_for)
        finally:
            back_after = await asyncio.to_thread(services.start_rabbitmq)
            log.info("fault: RabbitMQ is back (start took %.1f s)", back_after)
            counts["rabbitmq down s"] += round(self.down_for + back_after)


class PostgresRestart(Fault):
    """Restarts every ~20 s of load (at least one), in the shutdown modes given, in turn."""

    def __init__(self, modes: list[str], down_for: float) -> None:
        pause = f", down {down_for:g} s" if down_for else ""
        super().__init__(
            "postgres-restart",
            f"PostgreSQL restarted ({' then '.join(modes)} shutdown{pause}) under load",
        )
        self.modes = modes
        self.down_for = down_for

    async def inject(
        self, targets: list[Target], stop: asyncio.Event, duration: float, counts: Counter[str]
    ) -> None:
        restarts = max(1, int(duration // 20))
        gap = duration / (restarts + 1)
        for n in range(restarts):
            await asyncio.sleep(gap)
            mode = self.modes[n % len(self.modes)]
            log.info("fault: restarting PostgreSQL (%s)", mode)
            if self.down_for:
                try:
                    await asyncio.to_thread(services.stop_postgres, mode)
                    await asyncio.sleep(self.down_for)
                finally:
                    took = await asyncio.to_thread(services.start_postgres)
            else:
                took = await asyncio.to_thread(services.restart_postgres, mode)
            log.info("fault: PostgreSQL is back (took %.1f s)", took)
            counts[f"postgres {mode}"] += 1


class ConsumeDisconnect(Fault):
    def __init__(self) -> None:
        super().__init__(
            "consume-disconnect",
            "extra consume clients that drop the connection mid-request",
            continuous=True,
            disconnectors=True,
        )


class ExportFreeze(Fault):
    """The export directory's filesystem frozen (`fsfreeze`: every write waits, as on an NFS
    server that is gone) every ~15 s of load (at least once), then thawed."""

    def __init__(self, frozen_for: float) -> None:
        super().__init__(
            "export-freeze",
            f"the export directory's filesystem frozen for {frozen_for:g} s, then thawed",
            own_filesystem=True,
        )
        self.frozen_for = frozen_for

    async def inject(
        self, targets: list[Target], stop: asyncio.Event, duration: float, counts: Counter[str]
    ) -> None:
        freezes = max(1, int(duration // 15))
        gap = duration / (freezes + 1)
        for _ in range(freezes):
            await asyncio.sleep(gap)
            log.info("fault: freezing the export filesystems for %g s", self.frozen_for)
            try:
                for target in targets:
                    await asyncio.to_thread(target.freeze)
                counts["export freezes"] += 1
                await asyncio.sleep(self.frozen_for)
            finally:
                for target in targets:
                    await asyncio.to_thread(target.thaw)
            log.info("fault: export filesystems thawed")


class Prune(Fault):
    """`workflows prune --workflows-older-than N` run again and again beside the load, half
    the runs killed with `kill -9` at a random moment of their second half (timed on the
    runs left to finish), the rest left to finish. A trigger the scenario puts on the
    `workflows` table records every row deleted, with its status and whether its export
    file was there (`verify.py`): a row deleted while not consumed is an accepted workflow
    lost."""

    def __init__(self, older_than: int) -> None:
        super().__init__(
            "prune",
            f"workflows prune --workflows-older-than {older_than}s again and again, half "
            "the runs killed with kill -9",
            continuous=True,
            audits_deletions=True,
        )
        self.older_than = older_than

    async def inject(
        self, targets: list[Target], stop: asyncio.Event, duration: float, counts: Counter[str]
    ) -> None:
        await asyncio.gather(*(self._prune_loop(target, stop, counts) for target in targets))

    async def _prune_loop(self, target: Target, stop: asyncio.Event, counts: Counter[str]) -> None:
        rng = random.Random()
        command = target.command("prune", "--workflows-older-than", f"{self.older_than}s")
        finished: list[float] = [2.0]  # seconds a run took; a guess until one finishes
        n = 0
        while not stop.is_set():
            n += 1
            process = await asyncio.create_subprocess_exec(
                *command,
                env=target.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            started = loop_time()
            kill_at = rng.uniform(0.5, 1.0) * statistics.median(finished) if n % 2 else None
            try:
                _, stderr = await asyncio.wait_for(process.communicate(), kill_at)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):  # it ended as the timer fired
                    process.kill()
                await process.wait()
                if process.returncode == -signal.SIGKILL:
                    counts[f"{target.backend} prune killed"] += 1
                    continue
                stderr = b"(its error output was not read)"
            if process.returncode != 0:
                raise RuntimeError(f"{target.label}: workflows prune failed: {stderr.decode()}")
            finished.append(loop_time() - started)
            counts[f"{target.backend} prune finished"] += 1


def loop_time() -> float:
    return asyncio.get_running_loop().time()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep; True as soon as `stop` is set."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
        return True
    except TimeoutError:
        return False


def scenarios(
    *,
    kill_every: tuple[float, float],
    rabbit_down_for: float,
    rabbit_mode: str,
    pg_modes: list[str],
    pg_down_for: float,
    frozen_for: float,
    prune_older_than: int,
) -> dict[str, Fault]:
    faults: list[Fault] = [
        Baseline(),
        KillWorker(kill_every),
        RabbitOutage(rabbit_down_for, rabbit_mode),
        PostgresRestart(pg_modes, pg_down_for),
        ConsumeDisconnect(),
        ExportFreeze(frozen_for),
        Prune(prune_older_than),
    ]
    return {fault.name: fault for fault in faults}

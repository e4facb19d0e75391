"""One target of a scenario: a fresh database, a queue name, an export directory, and the
API serving them under uvicorn with two workers, in a process group of its own."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

from scripts.chaos.services import AMQP_URL, HOST, PG_PORT, broker_queue_depth_and_delete

log = logging.getLogger("chaos")

ROOT = Path(__file__).resolve().parents[2]
ADMIN_URL = f"postgresql://postgres@{HOST}:{PG_PORT}/postgres"
START_TIMEOUT = 90.0

_groups: set[int] = set()  # process groups of API servers still to end
_databases: set[str] = set()  # databases still to drop
_mounts: set[Path] = set()  # export filesystems still mounted (possibly frozen)
FILESYSTEM_SIZE = "256M"
"""Of an export directory's own ext4 image, when a scenario freezes it."""


def database_url(name: str) -> str:
    return f"postgresql://postgres@{HOST}:{PG_PORT}/{name}"


def _admin(statement: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(statement)  # names are ours ([a-z0-9_]), never user input


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Target:
    """One backend under test in one scenario, with everything it owns."""

    scenario: str
    backend: str
    workdir: Path
    keep: bool = False
    own_filesystem: bool = False
    """The export directory on an ext4 filesystem of its own (a loop-mounted image), which
    a fault can freeze."""
    reachable_exports: bool = False
    """The export directory where PostgreSQL's server can look (`pg_stat_file`): in a
    directory of its own under the system's temporary directory, open to every user to pass
    through, not under `workdir` (a clone in a private directory, `mktemp -d`'s, shuts the
    server out)."""
    name: str = field(init=False)
    exports_base: Path = field(init=False)
    port: int = field(init=False, default=0)
    process: subprocess.Popen[bytes] | None = field(init=False, default=None)
    broker_left: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.name = f"chaos_{secrets.token_hex(4)}_{self.backend[:2]}"
        self.exports_base = self.workdir
        if self.reachable_exports:
            self.exports_base = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
            self.exports_base.chmod(0o755)

    @property
    def label(self) -> str:
        return f"{self.scenario}/{self.backend}"

    @property
    def database(self) -> str:
        return database_url(self.name)

    @property
    def queue(self) -> str:
        return self.name.replace("_", "-")

    @property
    def export_dir(self) -> Path:
        return self.exports_base / f"{self.name}-exports"

    @property
    def image(self) -> Path:
        return self.workdir / f"{self.name}-exports.img"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.scenario}-{self.backend}.log"

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def start(self) -> None:
        if not self.keep:
            _databases.add(self.name)  # dropped at exit whatever happens
        await asyncio.to_thread(_admin, f"CREATE DATABASE {self.name}")
        self.export_dir.mkdir(parents=True)
        if self.own_filesystem:
            await asyncio.to_thread(mount_ext4, self.image, self.export_dir)
        self.port = _free_port()
        command = [*self.command("serve"), "--port", str(self.port), "--workers", "2"]
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(  # noqa: ASYNC220 (returns at once)
                command,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: we end it whole
            )
        _groups.add(self.process.pid)
        await self._wait_ready()

    @property
    def env(self) -> dict[str, str]:
        """The environment of the target's `workflows` processes (the API, a prune)."""
        return os.environ | {
            "DATABASE_URL": self.database,
            "RABBITMQ_URL": AMQP_URL,
            "RABBITMQ_QUEUE": self.queue,
            "QUEUE_BACKEND": self.backend,
            "EXPORT_DIR": str(self.export_dir),
            "HOST": HOST,
        }

    @staticmethod
    def command(*arguments: str) -> list[str]:
        return [str(Path(sys.executable).with_name("workflows")), *arguments]

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        async with httpx.AsyncClient(base_url=self.base_url, trust_env=False) as client:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.label}: the API exited; see {self.log_path}")
                try:
                    ready = (await client.get("/readyz", timeout=5)).status_code == 200
                    if ready and len(self.worker_pids()) == 2:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.25)
        raise RuntimeError(f"{self.label}: the API was not ready in {START_TIMEOUT:.0f}s")

    def worker_pids(self) -> list[int]:
        """uvicorn's worker processes: the parent's children that run spawn_main."""
        if self.process is None:
            return []
        parent = self.process.pid
        return [pid for pid, ppid, worker in _processes() if ppid == parent and worker]

    def stop(self) -> None:
        if self.process is not None:
            end_group(self.process.pid)
            self.process.wait()

    def cleanup(self, *, keep_files: bool) -> None:
        """Drop the database, delete the queue, and remove the exports and the API's log
        (unless kept: a failing scenario keeps them as evidence)."""
        self.broker_left = broker_queue_depth_and_delete(self.queue)
        if not self.keep:
            drop_database(self.name)
        if self.own_filesystem and not keep_files:
            unmount(self.export_dir)
            self.image.unlink(missing_ok=True)
        if not keep_files:
            shutil.rmtree(self.export_dir, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)
            if self.reachable_exports:
                shutil.rmtree(self.exports_base, ignore_errors=True)

    @property
    def stalls_logged(self) -> int:
        """Event loop stalls its workers logged (README, *Observability*)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return text.count("the event loop has run nothing for")

    def freeze(self) -> None:
        """Hold every write to the export directory until `thaw` (fsfreeze)."""
        _run("fsfreeze", "--freeze", str(self.export_dir))

    def thaw(self) -> None:
        _run("fsfreeze", "--unfreeze", str(self.export_dir))


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")


def mount_ext4(image: Path, mount_point: Path) -> None:
    """A new ext4 filesystem in `image`, loop-mounted on `mount_point` (needs root)."""
    _run("truncate", "-s", FILESYSTEM_SIZE, str(image))
    _run("mkfs.ext4", "-q", "-F", str(image))
    _run("mount", "-o", "loop", str(image), str(mount_point))
    _mounts.add(mount_point)


def unmount(mount_point: Path) -> None:
    """Thaw (if frozen) and unmount; the loop device goes once nothing uses it."""
    subprocess.run(["fsfreeze", "--unfreeze", str(mount_point)], capture_output=True)
    subprocess.run(["umount", "--lazy", str(mount_point)], capture_output=True)
    _mounts.discard(mount_point)


def thaw_everything() -> None:
    """Thaw every export filesystem still mounted: a worker held by a frozen one cannot
    end, not even on SIGKILL."""
    for mount_point in list(_mounts):
        subprocess.run(["fsfreeze", "--unfreeze", str(mount_point)], capture_output=True)


def _processes() -> list[tuple[int, int, bool]]:
    """(pid, ppid, is a uvicorn worker) for every process, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        found.append((int(entry), ppid, b"spawn_main" in cmdline))
    return found


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


def end_group(pgid: int, grace: float = 8.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _group_members(pgid):
            break
    _groups.discard(pgid)


def drop_database(name: str) -> None:
    try:
        _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        _databases.discard(name)
    except psycopg.Error as error:
        log.warning("could not drop database %s: %s", name, error)


def end_everything(*, drop: bool = True) -> None:
    """At exit: end every API process group still running, drop every database left,
    unmount every export filesystem left."""
    thaw_everything()
    for pgid in list(_groups):
        end_group(pgid, grace=3.0)
    if drop:
        for name in list(_databases):
            drop_database(name)
        for mount_point in list(_mounts):
            unmount(mount_point)

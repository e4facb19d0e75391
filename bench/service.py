"""The service under test, started the way it is deployed: `workflows serve --workers N`."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".venv" / "bin" / "workflows"


class Service:
    """One `workflows serve` (uvicorn master and its workers), in a process group of its own
    so that stopping it stops every worker and nothing else."""

    def __init__(
        self,
        *,
        backend: str,
        database_url: str,
        rabbitmq_url: str,
        queue: str,
        port: int,
        workers: int,
        cpus: str | None,
        export_dir: Path,
        log: Path,
    ) -> None:
        self.backend = backend
        self.port = port
        self.workers = workers
        self.url = f"http://127.0.0.1:{port}"
        self._env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "RABBITMQ_URL": rabbitmq_url,
            "RABBITMQ_QUEUE": queue,
            "QUEUE_BACKEND": backend,
            "EXPORT_DIR": str(export_dir),
            "LOG_LEVEL": "WARNING",
        }
        command = [str(WORKFLOWS), "serve", "--port", str(port), "--workers", str(workers)]
        self._command = ["taskset", "-c", cpus, *command] if cpus else command
        self._log = log
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                self._command,
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=ROOT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the service exited at start-up; see {self._log}")
            if self._ready() and len(self.worker_pids()) == self.workers:
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the service was not ready in {timeout}s; see {self._log}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        end_group(process, 30)

    def worker_pids(self) -> list[int]:
        """The uvicorn worker processes (with one worker uvicorn serves in the master)."""
        if self._process is None:
            return []
        if self.workers == 1:
            return [self._process.pid]
        children = Path(f"/proc/{self._process.pid}/task/{self._process.pid}/children")
        try:
            pids = [int(pid) for pid in children.read_text().split()]
        except OSError:
            return []
        # uvicorn's multiprocessing also starts a resource tracker: keep the workers.
        return [pid for pid in pids if "resource_tracker" not in _cmdline(pid)]

    def rss_kib(self) -> dict[int, int]:
        return {pid: rss for pid in self.worker_pids() if (rss := _rss_kib(pid)) is not None}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def end_group(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM to the process group that `process` leads, SIGKILL after `grace` seconds."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

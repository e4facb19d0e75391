"""A real `workflows serve` whose export directory's filesystem stops answering: an ext4
image, loop-mounted and frozen (`fsfreeze`), where every write waits until it is thawed,
as on an NFS server that is gone. A consume's file write then holds the worker's event
loop (README, *Observability*): the worker logs the stall with where its loop is held,
counts it, and, thawed, finishes the consume and logs that its loop runs again."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import unavailable
from tests.support.processes import inherited_environment, served
from workflows.adapters.csv_export.exporter import PROBE_EVERY, PROBE_TIMEOUT
from workflows.adapters.postgres import PostgresDatabase

TOKEN = "frozen-filesystem-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")


@pytest.fixture
def mounted_ext4(tmp_path: Path) -> Iterator[Path]:
    image, mount_point = tmp_path / "ext4.img", tmp_path / "ext4"
    mount_point.mkdir()
    try:
        run("truncate", "-s", "64M", str(image))
        run("mkfs.ext4", "-q", "-F", str(image))
        run("mount", "-o", "loop", str(image), str(mount_point))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
        unavailable("a loop-mounted ext4 filesystem (root and a loop device)", error)
    try:
        yield mount_point
    finally:
        subprocess.run(["fsfreeze", "--unfreeze", str(mount_point)], capture_output=True)
        run("umount", "--lazy", str(mount_point))


def log_lines(path: Path) -> list[dict[str, object]]:
    lines = []
    for line in path.read_bytes().splitlines():
        if line.startswith(b"{"):
            lines.append(orjson.loads(line))
    return lines


def loop_watch_messages(path: Path) -> list[str]:
    return [
        str(line["message"])
        for line in log_lines(path)
        if line.get("logger") == "workflows.entrypoints.loop_watch"
    ]


def server_env(database_url: str, exports: Path) -> dict[str, str]:
    return inherited_environment() | {
        "DATABASE_URL": database_url,
        "QUEUE_BACKEND": "postgres",
        "EXPORT_DIR": str(exports),
        "API_TOKENS": TOKEN,
        "LOG_FORMAT": "json",
        "LOOP_STALL_SECONDS": "0.5",
        "DB_POOL_SIZE": "2",
    }


def test_a_consume_held_by_a_frozen_filesystem_is_logged_with_where_the_loop_waits(
    mounted_ext4: Path, database_url: str, pg: PostgresDatabase, tmp_path: Path
) -> None:
    env = server_env(database_url, mounted_ext4 / "exports")
    log = tmp_path / "api.log"
    with served(env, tmp_path, "api") as url, httpx.Client(headers=AUTH, timeout=30) as http:
        for _ in range(2):
            body = {"data": {"a": 1}, "steps": ["x"]}
            assert http.post(f"{url}/workflow", json=body).status_code == 201
        # The first consume makes the directory, its flush record and the spare files.
        assert http.get(f"{url}/workflow/consume").status_code == 200
        time.sleep(0.5)
        assert loop_watch_messages(log) == []

        run("fsfreeze", "--freeze", str(mounted_ext4))
        frozen = True
        answers: list[httpx.Response] = []
        consuming = threading.Thread(
            target=lambda: answers.append(http.get(f"{url}/workflow/consume"))
        )
        try:
            consuming.start()
            # The premise: while the write waits, the loop answers nothing, not even this.
            with pytest.raises(httpx.TimeoutException):
                httpx.get(f"{url}/healthz", timeout=2)
            deadline = time.monotonic() + 10
            while not loop_watch_messages(log) and time.monotonic() < deadline:
                time.sleep(0.1)
            held = loop_watch_messages(log)
            assert len(held) == 1, held
            assert held[0].startswith("the event loop has run nothing for ")
            assert "(LOOP_STALL_SECONDS=0.5)" in held[0]
            assert "in: csv_export/files.py:" in held[0], held[0]
            assert " _write_all < " in held[0], held[0]
            run("fsfreeze", "--unfreeze", str(mounted_ext4))
            frozen = False
            consuming.join(timeout=30)
        finally:
            if frozen:
                subprocess.run(["fsfreeze", "--unfreeze", str(mounted_ext4)])
            consuming.join(timeout=30)

        assert [answer.status_code for answer in answers] == [200]
        uuid = answers[0].headers["X-Workflow-UUID"]
        assert (mounted_ext4 / "exports" / f"{uuid}.csv").read_bytes() == answers[0].content
        assert http.get(f"{url}/healthz").status_code == 200
        again = loop_watch_messages(log)[1:]
        assert len(again) == 1, again
        assert again[0].startswith("the event loop runs again: it ran nothing for ")
        held_for = float(again[0].rsplit(" ", 2)[-2])
        assert held_for >= 1.5  # the /healthz timeout above, less up to a heartbeat
        metrics = http.get(f"{url}/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(metrics)}
        stalls = families["workflows_event_loop_stalls"].samples
        assert [s.value for s in stalls if s.name.endswith("_total")] == [1.0]


def test_a_filesystem_frozen_before_any_consume_writes_there_gets_consumes_a_503_at_once(
    mounted_ext4: Path, database_url: str, pg: PostgresDatabase, tmp_path: Path
) -> None:
    """Frozen while no consume writes there, the directory holds nothing: the flusher's
    probe (one every PROBE_EVERY s) is held instead, and once it is PROBE_TIMEOUT late a
    consume answers 503 at once, touching no file, as /readyz does; POSTs and lists go on
    and the loop is never held. Thawed, the consume takes the workflow."""
    env = server_env(database_url, mounted_ext4 / "exports")
    with served(env, tmp_path, "api") as url, httpx.Client(headers=AUTH, timeout=30) as http:
        run("fsfreeze", "--freeze", str(mounted_ext4))
        try:
            time.sleep(PROBE_EVERY + PROBE_TIMEOUT + 2)  # a probe began, and is late by now
            body = {"data": {"a": 1}, "steps": ["x"]}
            assert http.post(f"{url}/workflow", json=body).status_code == 201
            started = time.monotonic()
            refused = http.get(f"{url}/workflow/consume")
            assert time.monotonic() - started < 2.0
            assert refused.status_code == 503, refused.text
            assert "export directory" in refused.json()["detail"]
            assert "Retry-After" in refused.headers
            started = time.monotonic()
            ready = http.get(f"{url}/readyz")
            assert time.monotonic() - started < 2.0
            assert ready.status_code == 503
            assert ready.json()["checks"]["exports"] == "unavailable"
            for _ in range(19):
                assert http.post(f"{url}/workflow", json=body).status_code == 201
            assert len(http.get(f"{url}/workflow", params={"limit": 100}).json()) == 20
        finally:
            run("fsfreeze", "--unfreeze", str(mounted_ext4))
        deadline = time.monotonic() + 10
        while http.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "not ready 10 s after the thaw"
            time.sleep(0.2)
        consumed = http.get(f"{url}/workflow/consume")
        assert consumed.status_code == 200
        uuid = consumed.headers["X-Workflow-UUID"]
        assert (mounted_ext4 / "exports" / f"{uuid}.csv").read_bytes() == consumed.content
        assert loop_watch_messages(tmp_path / "api.log") == []  # the loop was never held

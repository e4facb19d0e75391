"""Real `workflows` processes for tests: started with the console script, talked to over
TCP, and stopped (SIGTERM, then SIGKILL of their own process group) however a test ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.support.tcp_proxy import free_port

WORKFLOWS_BIN = Path(sys.executable).with_name("workflows")
# Settings a test's servers must not inherit from the environment pytest runs in.
SERVER_VARIABLES = (
    "API_TOKENS",
    "ALLOW_UNAUTHENTICATED",
    "PROMETHEUS_MULTIPROC_DIR",
    "QUEUE_BACKEND",
    "RABBITMQ_URL",
    "RABBITMQ_QUEUE",
    "HOST",
    "PORT",
)


def inherited_environment() -> dict[str, str]:
    """This process's environment without SERVER_VARIABLES: a server's base."""
    return {k: v for k, v in os.environ.items() if k not in SERVER_VARIABLES}


@contextmanager
def running(
    env: dict[str, str], cwd: Path, *arguments: str, name: str, stop_timeout: float = 15
) -> Iterator[subprocess.Popen[bytes]]:
    """A `workflows` process in a process group of its own, logging to `cwd/{name}.log`;
    stopped on the way out: SIGTERM, then SIGKILL of its group after `stop_timeout` s."""
    log = (cwd / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [str(WORKFLOWS_BIN), *arguments],
        env=env,
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


@contextmanager
def served(env: dict[str, str], cwd: Path, name: str, workers: int = 1) -> Iterator[str]:
    """`workflows serve` on a free port; its base URL once /readyz answers 200."""
    with serving(env, cwd, name, workers) as (url, _):
        yield url


@contextmanager
def serving(
    env: dict[str, str], cwd: Path, name: str, workers: int = 1
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """As `served`, with the process too (the leader of its own process group)."""
    port = free_port()
    arguments = ("serve", "--port", str(port), "--workers", str(workers))
    with running(env, cwd, *arguments, name=name) as process:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                log = (cwd / f"{name}.log").read_text()
                pytest.fail(f"{name} exited with {process.returncode}:\n{log}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{name} not ready in 30 s"
            time.sleep(0.1)
        yield url, process

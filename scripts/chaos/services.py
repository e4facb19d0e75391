"""The machine's PostgreSQL and RabbitMQ: take them down for a fault, always bring them back.

Every service this process takes down is recorded first, then stopped; `restore()` brings
back whatever is recorded and then checks that both services answer, starting either one if
it does not (CI runs on this machine after us, against the services as we leave them).
`restore()` is called after every fault, in the runner's `finally`, on SIGINT/SIGTERM/SIGHUP
and at exit, and is safe to call any number of times.

Service commands run in a session of their own, so that a Ctrl-C in the terminal that runs
the suite never reaches a daemon they start.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable

import pika
from pika.exceptions import AMQPError

log = logging.getLogger("chaos")

HOST = "127.0.0.1"
PG_PORT = 5432
AMQP_PORT = 5672
AMQP_URL = f"amqp://guest:guest@{HOST}:{AMQP_PORT}/%2F"
COMMAND_TIMEOUT = 120.0
COME_BACK_TIMEOUT = 120.0

_taken_down: set[str] = set()
_lock = threading.Lock()


def run(
    command: list[str], *, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait(ready: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def _mark(service: str) -> None:
    with _lock:
        _taken_down.add(service)


def _unmark(service: str) -> None:
    with _lock:
        _taken_down.discard(service)


def taken_down() -> set[str]:
    with _lock:
        return set(_taken_down)


# PostgreSQL ----------------------------------------------------------------------------


def postgres_cluster() -> tuple[str, str]:
    """(version, name) of the cluster on port 5432, as pg_ctlcluster wants them."""
    listing = run(["pg_lsclusters", "-h"], timeout=30).stdout
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == str(PG_PORT):
            return fields[0], fields[1]
    return sorted(os.listdir("/etc/postgresql"))[-1], "main"


def postgres_ready() -> bool:
    return run(["pg_isready", "-q", "-h", HOST, "-p", str(PG_PORT), "-t", "3"]).returncode == 0


def restart_postgres(mode: str = "fast") -> float:
    """`pg_ctlcluster restart`; returns the seconds until PostgreSQL accepted connections
    again. `fast`: sessions are cut and open transactions roll back, a clean shutdown.
    `immediate`: the server stops as if it crashed, and recovers from its WAL on start."""
    version, name = postgres_cluster()
    _mark("postgresql")
    started = time.monotonic()
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", "--mode", mode]
    result = run([*command, version, name, "restart"])
    if result.returncode != 0:
        log.warning("pg_ctlcluster restart failed: %s", result.stderr.strip())
    ensure_postgres()
    _unmark("postgresql")
    return time.monotonic() - started


def stop_postgres(mode: str = "fast") -> None:
    """`pg_ctlcluster stop`; `ensure_postgres()` starts it again."""
    version, name = postgres_cluster()
    _mark("postgresql")
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", "--mode", mode]
    result = run([*command, version, name, "stop"])
    if result.returncode != 0:
        log.warning("pg_ctlcluster stop failed: %s", result.stderr.strip())


def start_postgres() -> float:
    """Bring PostgreSQL back; the seconds it took."""
    started = time.monotonic()
    version, name = postgres_cluster()
    run(["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "start"])
    ensure_postgres()
    _unmark("postgresql")
    return time.monotonic() - started


def ensure_postgres(timeout: float = COME_BACK_TIMEOUT) -> None:
    if postgres_ready():
        return
    version, name = postgres_cluster()
    # Give a restart in flight (ours, or a fast one) a moment before starting it ourselves.
    if _wait(postgres_ready, 10):
        return
    log.warning("PostgreSQL is down: starting cluster %s/%s", version, name)
    run(["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "start"])
    if not _wait(postgres_ready, timeout):
        raise RuntimeError(f"PostgreSQL did not come back within {timeout:.0f}s")


# RabbitMQ ------------------------------------------------------------------------------


def rabbitmq_ready() -> bool:
    """The broker completes an AMQP handshake on 127.0.0.1:5672 (what our service needs)."""
    parameters = pika.URLParameters(AMQP_URL)
    parameters.connection_attempts = 1
    parameters.socket_timeout = 3
    parameters.stack_timeout = 5
    parameters.blocked_connection_timeout = 5
    try:
        pika.BlockingConnection(parameters).close()
        return True
    except (AMQPError, OSError):
        return False


def stop_rabbitmq(mode: str) -> None:
    """`app`: `rabbitmqctl stop_app` closes the listener and every connection and stops the
    queues, while the Erlang node (a process the machine started) stays up. `node`:
    `rabbitmqctl shutdown` ends the whole VM; `start_rabbitmq` then starts a new one."""
    _mark("rabbitmq")
    command = ["stop_app"] if mode == "app" else ["shutdown", "--wait"]
    result = run(["rabbitmqctl", "-q", *command])
    if result.returncode != 0:
        log.warning("rabbitmqctl %s failed: %s", command[0], result.stderr.strip()[:500])


def start_rabbitmq() -> float:
    """Bring RabbitMQ back; the seconds it took."""
    started = time.monotonic()
    ensure_rabbitmq()
    _unmark("rabbitmq")
    return time.monotonic() - started


def ensure_rabbitmq(timeout: float = COME_BACK_TIMEOUT) -> None:
    if rabbitmq_ready():
        return
    if run(["rabbitmqctl", "-q", "ping"], timeout=30).returncode == 0:
        log.info("RabbitMQ node is up, its application is not: start_app")
        run(["rabbitmqctl", "-q", "start_app"])
    else:
        log.warning("RabbitMQ node is down: rabbitmq-server -detached")
        run(["rabbitmq-server", "-detached"])
    deadline = time.monotonic() + timeout
    while not rabbitmq_ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"RabbitMQ did not come back within {timeout:.0f}s")
        # Fails at once while the node is still booting; then waits for the app.
        run(["rabbitmqctl", "-q", "await_startup", "--timeout", "10"], timeout=30)
        time.sleep(0.5)


# Both -------------------------------------------------------------------------------------


def restore() -> list[str]:
    """Bring back everything we took down, then make sure both services answer. Returns
    the problems left (empty when both are up)."""
    problems = []
    for name, ensure in (("postgresql", ensure_postgres), ("rabbitmq", ensure_rabbitmq)):
        try:
            ensure()
            _unmark(name)
        except Exception as error:
            problems.append(f"{name}: {error}")
    return problems


def broker_queue_depth_and_delete(queue: str) -> int | None:
    """Messages left in `queue` (ready, including requeued ones), then delete it and its
    dead-letter queue (`<queue>.dead`); None when it was never declared."""
    parameters = pika.URLParameters(AMQP_URL)
    parameters.connection_attempts = 2
    parameters.socket_timeout = 5
    depth = None
    try:
        with pika.BlockingConnection(parameters) as connection:
            for name in (queue, f"{queue}.dead"):
                channel = connection.channel()
                try:
                    declared = channel.queue_declare(name, passive=True)
                except AMQPError:  # never declared (the postgres backend, an early failure)
                    continue
                if name == queue:
                    depth = int(declared.method.message_count)
                channel.queue_delete(name)
    except (AMQPError, OSError) as error:
        log.warning("could not inspect or delete rabbitmq queue %s: %r", queue, error)
    return depth

"""The command line: `workflows serve`, `migrate`, `stats`, `relay`, `prune`."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import attrs
from dotenv import load_dotenv

# Nothing imported here may import prometheus_client: `serve` must set
# PROMETHEUS_MULTIPROC_DIR first (tests/unit/test_observability.py checks).
from workflows.adapters.embedded_postgres import EmbeddedPostgres, NotInstalled
from workflows.adapters.postgres import migrate
from workflows.domain.errors import DependencyUnavailable
from workflows.entrypoints import operations
from workflows.entrypoints.config import ConfigError, Settings, check_host
from workflows.entrypoints.logs import configure_logging, logging_config, mask_values, redact
from workflows.entrypoints.security import protected_mode_refusal

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workflows", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="migrate the database, then serve the HTTP API")
    serve.add_argument("--host", help="address to listen on (default: HOST or 127.0.0.1)")
    serve.add_argument("--port", type=_port, help="port, 0 to 65535 (default: PORT or 5000)")
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    serve.add_argument(
        "--access-log", action="store_true", help="log every request (off: it costs throughput)"
    )
    serve.add_argument(
        "--graceful-timeout",
        type=_seconds,
        default=10.0,
        help="seconds in-flight requests get to finish on SIGTERM, 0 to 3600 (default 10)",
    )
    commands.add_parser("migrate", help="apply pending database migrations and exit")
    stats = commands.add_parser(
        "stats", help="print queue depth, outbox backlog and workflows by status"
    )
    stats.add_argument("--json", action="store_true", help="one JSON document instead of text")
    commands.add_parser(
        "relay",
        help="run the outbox relay alone, until SIGTERM (rabbitmq; every API process has one too)",
    )
    prune = commands.add_parser(
        "prune",
        help="delete consumed workflows and export files older than an age",
        description=(
            "Delete what a long-running service keeps until told: consumed workflows (and "
            "their exports) and export files. AGE is a number and a unit: 90s, 30m, 12h, 30d. "
            "Queued and dead-lettered workflows are never touched."
        ),
    )
    prune.add_argument(
        "--workflows-older-than",
        type=operations.age,
        metavar="AGE",
        help="consumed workflows last changed longer ago than AGE, with their exports",
    )
    prune.add_argument(
        "--exports-older-than",
        type=operations.age,
        metavar="AGE",
        help="export files written longer ago than AGE (GET /workflow/{uuid}/csv renders "
        "a kept workflow's CSV again)",
    )
    prune.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    args = parser.parse_args(argv)
    if args.command == "prune" and args.workflows_older_than is None is args.exports_older_than:
        parser.error("prune needs --workflows-older-than, --exports-older-than or both")

    try:
        load_dotenv(".env", override=False)
    except (UnicodeDecodeError, OSError) as exc:
        print(f"workflows: configuration error: .env cannot be read: {exc}", file=sys.stderr)
        return 2
    if not os.environ.get("WORKFLOWS_COMMIT", "").strip():  # unset or empty: its default
        os.environ["WORKFLOWS_COMMIT"] = _git_commit()
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"workflows: configuration error: {exc}", file=sys.stderr)
        return 2
    # A command whose stdout is its answer (stats, prune, migrate) logs to stderr, so that
    # a warning (the broker away) never breaks what a script reads, `stats --json` above all.
    answers = args.command in {"stats", "prune", "migrate"}
    configure_logging(
        settings.log_level, settings.log_format, stream="stderr" if answers else "stdout"
    )
    if answers:  # an unreachable database is one line on stderr, not a retry's line each
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    mask_values(settings.api_tokens)
    try:
        return _run(settings, args)
    except NotInstalled as exc:
        print(f"workflows: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # found once the command runs (PROMETHEUS_MULTIPROC_DIR)
        print(f"workflows: configuration error: {exc}", file=sys.stderr)
        return 2
    except DependencyUnavailable as exc:  # the database, at start: one line, no traceback
        line = " ".join(part.strip() for part in str(exc).splitlines())  # psycopg's hint too
        print(f"workflows: {redact(line)}", file=sys.stderr)
        return 1


def _run(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "stats":
        return operations.stats(_with_database(settings), as_json=args.json)
    if args.command == "relay":
        return operations.relay(_with_database(settings))
    if args.command == "prune":
        if args.workflows_older_than is not None and settings.queue_backend != "memory":
            settings = _with_database(settings)  # exports alone need no database
        return operations.prune(
            settings,
            workflows_older_than=args.workflows_older_than,
            exports_older_than=args.exports_older_than,
            dry_run=args.dry_run,
        )
    if args.command == "migrate":
        applied = migrate(_database_url(settings))
        print(f"applied migrations: {', '.join(applied) or 'none (up to date)'}")
        return 0
    return _serve(settings, args)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    try:
        host = check_host(args.host, "--host") if args.host else settings.host
    except ConfigError as exc:
        print(f"workflows: configuration error: {exc}", file=sys.stderr)
        return 2
    if refusal := protected_mode_refusal(host, settings) or _workers_refusal(
        args.workers, settings
    ):
        print(f"workflows: {refusal}", file=sys.stderr)
        return 2
    # Made (or emptied) first: a PROMETHEUS_MULTIPROC_DIR that cannot be is a configuration
    # error before anything is migrated.
    with operations.metrics_directory():
        return _migrate_and_serve(settings, args, host)


def _migrate_and_serve(settings: Settings, args: argparse.Namespace, host: str) -> int:
    import uvicorn

    from workflows.entrypoints.http_protocol import IDLE_TIMEOUT

    if settings.queue_backend != "memory":
        url = _database_url(settings)
        os.environ["DATABASE_URL"] = url
        # Stopped while it migrates (or waits for another process's migration lock): as
        # PID 1 in a container, with no handler of its own, the kernel dropped SIGTERM and
        # `docker stop` waited for its SIGKILL. A migration's transaction is rolled back.
        previous = {
            signum: signal.signal(signum, _stop_before_serving)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            applied = migrate(url)
        except _Stopped as stopped:
            log.info("stopped by signal %d before serving", stopped.signum)
            return 128 + stopped.signum
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        log.info("database: %s (migrations applied now: %d)", _redact(url), len(applied))
    log.info("queue backend: %s", settings.queue_backend)
    log.info("API tokens: %d configured", len(settings.api_tokens))
    # After its graceful shutdown a single-process uvicorn re-raises the signal that stopped
    # it; under the default SIGTERM action this process would die before the metrics
    # directory is removed. Ignored here, it ends `serve` normally: status 0, cleaned up.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: None)
    os.environ["WORKFLOWS_ACCESS_LOG"] = "1" if args.access_log else "0"
    uvicorn.run(
        "workflows.entrypoints.asgi:create",
        factory=True,
        host=host,
        port=settings.port if args.port is None else args.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        loop="uvloop",
        # httptools, a response head and body sent in one system call (http_protocol.py).
        http="workflows.entrypoints.http_protocol:CoalescingHttpToolsProtocol",
        access_log=args.access_log,
        timeout_graceful_shutdown=args.graceful_timeout,
        timeout_keep_alive=IDLE_TIMEOUT,
        log_config=logging_config(settings.log_level, settings.log_format, args.access_log),
    )
    return 0


class _Stopped(BaseException):
    """SIGTERM or SIGINT before `serve` serves (a BaseException: no `except Exception` on the
    way out takes it for a failure of its own)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_before_serving(signum: int, frame: object) -> None:
    raise _Stopped(signum)


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 3600:  # NaN too
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from 0 to 3600, not {text!r}"
        )
    return value


def _workers_refusal(workers: int, settings: Settings) -> str | None:
    if workers < 1:
        return f"--workers must be at least 1, not {workers}"
    if workers > 1 and settings.queue_backend == "memory":
        return (
            "QUEUE_BACKEND=memory keeps every workflow in one process: with --workers "
            f"{workers} each worker would have its own (use postgres or rabbitmq)"
        )
    return None


def _with_database(settings: Settings) -> Settings:
    return attrs.evolve(settings, database_url=_database_url(settings))


def _database_url(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    log.info(
        "DATABASE_URL is not set: starting an embedded PostgreSQL in %s", settings.embedded_data_dir
    )
    return EmbeddedPostgres(str(settings.embedded_data_dir)).start()


def _redact(url: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(url)
    if params.get("password"):
        params["password"] = "***"
    return make_conninfo(**params)  # type: ignore[arg-type]


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())

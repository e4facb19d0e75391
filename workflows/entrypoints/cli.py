"""The command line: `workflows serve`, `workflows migrate`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from dotenv import load_dotenv

from workflows.adapters.postgres import migrate
from workflows.entrypoints.config import ConfigError, Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workflows", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="migrate the database, then serve the HTTP API")
    serve.add_argument("--host", help="address to listen on (default: HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: PORT or 5000)")
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    serve.add_argument(
        "--access-log", action="store_true", help="log every request (off: it costs throughput)"
    )
    serve.add_argument(
        "--graceful-timeout",
        type=float,
        default=10.0,
        help="seconds in-flight requests get to finish on SIGTERM (default 10)",
    )
    commands.add_parser("migrate", help="apply pending database migrations and exit")
    args = parser.parse_args(argv)

    load_dotenv(".env", override=False)
    os.environ.setdefault("WORKFLOWS_COMMIT", _git_commit())
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"workflows: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "migrate":
        applied = migrate(_database_url(settings))
        print(f"applied migrations: {', '.join(applied) or 'none (up to date)'}")
        return 0
    return _serve(settings, args)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    if settings.queue_backend != "memory":
        url = _database_url(settings)
        os.environ["DATABASE_URL"] = url
        applied = migrate(url)
        print(f"database: {_redact(url)} (migrations applied now: {len(applied)})")
    print(f"queue backend: {settings.queue_backend}", flush=True)
    uvicorn.run(
        "workflows.entrypoints.asgi:create",
        factory=True,
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        loop="uvloop",
        http="httptools",
        access_log=args.access_log,
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    return 0


def _database_url(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    from workflows.adapters.embedded_postgres import EmbeddedPostgres

    print(
        f"DATABASE_URL is not set: starting an embedded PostgreSQL in {settings.embedded_data_dir}"
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

"""`python -m scripts.chaos [--short]`: the fault-injection suite (docs/chaos.md).

Exit status: 0 when every scenario passed and both services are up at the end; 1 on any
violation or scenario error; 2 when a service could not be brought back.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import logging
import shutil
import signal
import sys
import time
from datetime import UTC, datetime
from types import FrameType

from scripts.chaos import api, services
from scripts.chaos.faults import scenarios
from scripts.chaos.report import Row, section, text_table, write_doc
from scripts.chaos.runner import Plan, run_scenario

log = logging.getLogger("chaos")

BACKENDS = ("postgres", "rabbitmq")
SHORT = (
    "kill-worker",
    "rabbitmq-outage",
    "postgres-restart",
    "consume-disconnect",
    "export-freeze",
    "prune",
)
FULL = ("baseline", *SHORT)
DOC = api.ROOT / "docs" / "chaos.md"
KEEP_RUNS = 5


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.chaos", description=__doc__)
    parser.add_argument("--short", action="store_true", help="the CI version: ~10 s per scenario")
    parser.add_argument("--duration", type=float, help="seconds of load per scenario")
    parser.add_argument("--scenarios", help=f"comma-separated, of: {', '.join(FULL)}")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="postgres,rabbitmq")
    parser.add_argument(
        "--together",
        action=argparse.BooleanOptionalAction,
        help="run both backends side by side in each scenario (default: with --short)",
    )
    parser.add_argument(
        "--rabbit-mode",
        choices=("app", "node"),
        default="app",
        help="how RabbitMQ is stopped: stop_app (default) or a whole-node shutdown",
    )
    parser.add_argument("--rabbit-down", type=float, default=10.0, help="seconds RabbitMQ is down")
    parser.add_argument(
        "--pg-modes",
        help="shutdown modes of the PostgreSQL restarts, in turn: fast (clean) or immediate "
        "(like a crash); default fast,immediate, with --short fast",
    )
    parser.add_argument(
        "--pg-down",
        type=float,
        default=0.0,
        help="seconds PostgreSQL stays stopped in a restart (default 0: a plain restart)",
    )
    parser.add_argument(
        "--frozen-for",
        type=float,
        default=4.0,
        help="seconds the export filesystem stays frozen (default 4)",
    )
    parser.add_argument(
        "--prune-older-than",
        type=int,
        default=1,
        help="the prune scenario's --workflows-older-than, in seconds (default 1)",
    )
    parser.add_argument(
        "--kill-every", default="2,4", help="seconds between two kill -9: LOW,HIGH (default 2,4)"
    )
    parser.add_argument("--csv-sample", help="consumed workflows to GET …/csv: N or all")
    parser.add_argument("--keep", action="store_true", help="keep databases and exports")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/chaos.md")
    parser.add_argument(
        "--restore", action="store_true", help="only bring PostgreSQL and RabbitMQ back up"
    )
    return parser.parse_args(argv)


def cleanup() -> list[str]:
    """End our API processes, bring back every service, drop leftover databases. Runs from
    `finally` and again at exit; each step is idempotent."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut a restore short
    try:
        api.end_everything(drop=False)
        problems = services.restore()
        api.end_everything(drop=True)
        return problems
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


async def run(args: argparse.Namespace) -> list[Row]:
    duration = _duration(args)
    names = args.scenarios.split(",") if args.scenarios else list(SHORT if args.short else FULL)
    sample = args.csv_sample or ("200" if args.short else "all")
    plan = Plan(
        mode="short" if args.short else "full",
        duration=duration,
        csv_sample=None if sample == "all" else int(sample),
        keep=args.keep,
    )
    low, high = (float(n) for n in args.kill_every.split(","))
    faults = scenarios(
        kill_every=(low, high),
        rabbit_down_for=args.rabbit_down,
        rabbit_mode=args.rabbit_mode,
        pg_modes=_pg_modes(args),
        pg_down_for=args.pg_down,
        frozen_for=args.frozen_for,
        prune_older_than=args.prune_older_than,
    )
    unknown = [name for name in names if name not in faults]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {unknown}; known: {list(faults)}")
    backends = args.backends.split(",")
    together = args.short if args.together is None else args.together
    runs = api.ROOT / "var" / "chaos"
    for old in sorted(runs.glob("2*"))[:-KEEP_RUNS]:  # what earlier failing runs kept
        shutil.rmtree(old, ignore_errors=True)
    workdir = runs / datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    log.info(
        "chaos %s: %s x %s, %.0f s of load each; logs in %s",
        plan.mode,
        names,
        backends,
        duration,
        workdir,
    )
    rows: list[Row] = []
    for name in names:
        groups = [backends] if together else [[backend] for backend in backends]
        for group in groups:
            rows += await run_scenario(faults[name], group, plan, workdir)
            print(text_table(rows[-len(group) :]), flush=True)
    with contextlib.suppress(OSError):
        workdir.rmdir()  # empty when every scenario passed
    return rows


def _pg_modes(args: argparse.Namespace) -> list[str]:
    modes = (args.pg_modes or ("fast" if args.short else "fast,immediate")).split(",")
    if not set(modes) <= {"fast", "immediate"}:
        raise SystemExit(f"--pg-modes: fast or immediate, not {args.pg_modes!r}")
    return modes


def _duration(args: argparse.Namespace) -> float:
    return float(args.duration or (10.0 if args.short else 45.0))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s chaos %(levelname)s %(message)s", stream=sys.stderr
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    if args.restore:
        problems = services.restore()
        print("\n".join(problems) or "PostgreSQL and RabbitMQ are up")
        return 2 if problems else 0
    atexit.register(cleanup)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    problems = services.restore()  # start from a machine whose services are up
    if problems:
        print(f"chaos: services are down and could not be started: {problems}", file=sys.stderr)
        return 2
    started = time.monotonic()
    rows: list[Row] = []
    aborted = 0
    try:
        rows = asyncio.run(run(args))
    except KeyboardInterrupt as error:
        aborted = 130
        print(f"chaos: interrupted ({str(error) or 'SIGINT'}); cleaning up", file=sys.stderr)
    except Exception:
        aborted = 1
        log.exception("chaos: the run failed; cleaning up")
    finally:
        problems = cleanup()
    if aborted:
        print("\n".join(problems) or "chaos: PostgreSQL and RabbitMQ are up", file=sys.stderr)
        return 2 if problems else aborted
    return _report(args, rows, time.monotonic() - started, problems)


def _customised(args: argparse.Namespace) -> bool:
    defaults = parse(["--short"] if args.short else [])
    return any(
        getattr(args, name) != getattr(defaults, name)
        for name in vars(defaults)
        if name not in ("no_doc", "keep")
    )


def _report(args: argparse.Namespace, rows: list[Row], wall: float, problems: list[str]) -> int:
    mode = "short" if args.short else "full"
    print(f"\nchaos {mode}: {len(rows)} runs in {wall:.0f} s\n{text_table(rows)}")
    for row in rows:
        for note in [*([row.error] if row.error else []), *row.notes]:
            print(f"  {row.scenario}/{row.backend}: {note}")
    if _customised(args):
        print("chaos: docs/chaos.md left as it was (a customised run)")
    elif not args.no_doc and rows:
        command = "make chaos-short" if args.short else "make chaos"
        settings = (
            f"{_duration(args):.0f} s of load per scenario (longer for a scheduled fault), "
            f"8 POST + 4 consume clients per backend, backends "
            f"{'side by side' if args.short else 'one after the other'}"
        )
        write_doc(DOC, mode, section(mode, rows, wall, command, settings))
    if problems:
        print(f"chaos: SERVICES NOT RESTORED: {problems}", file=sys.stderr)
        return 2
    print("chaos: PostgreSQL and RabbitMQ are up")
    return 0 if rows and all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

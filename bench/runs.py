"""What the phases share: the connection counts, the body, the queue index, and how a
wrk run, the service, a file probe and an outbox drain are done."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import db as dbmod
import tools
from service import Service
from tools import Result

if TYPE_CHECKING:
    from bench import Context

POST_CONNECTIONS = 32
CONSUME_CONNECTIONS = 8
LIST_SCALE_CONNECTIONS = 8
BODY = Path(__file__).with_name("body.json")

# The index a SKIP LOCKED claim needs to stay O(1): only the queued rows, in claim order.
# Without it the planner, seeing that nearly every row is inserted, walks the primary key
# and filters, stepping over every row consumed so far on each claim (bench/notes.md). The
# raw limit is measured with it (created for that run only, then dropped), and once more
# on the schema as it is.
QUEUE_INDEX = """
CREATE INDEX bench_queue_idx ON workflows (uuid)
WHERE status = 'inserted' AND dead_lettered_at IS NULL
"""


def wrk(ctx: Context, name: str, url: str, script: str, conns: int, seconds: float) -> Result:
    env = {"BENCH_BODY": str(BODY), "BENCH_ROWS": str(ctx.mode.rows_small)}
    if ctx.mode.warmup:
        tools.wrk(
            name,
            url,
            script,
            connections=conns,
            seconds=ctx.mode.warmup,
            cpus=ctx.load_cpus,
            env=env,
        )
    return tools.wrk(
        name, url, script, connections=conns, seconds=seconds, cpus=ctx.load_cpus, env=env
    )


def make_service(
    ctx: Context, backend: str, port: int, queue: str, database: dbmod.Database | None = None
) -> Service:
    """The service on the run's database (or `database`)."""
    return Service(
        backend=backend,
        database_url=(database or ctx.db).url,
        rabbitmq_url=ctx.rabbitmq_url,
        queue=queue,
        port=port,
        workers=ctx.workers,
        cpus=ctx.server_cpus,
        # One directory per backend, as each deployment has its own: the backends share
        # the prefilled uuids, and a consume that replaces a file costs far more than one
        # that makes it, as a real consume does (bench/notes.md).
        export_dir=ctx.out / "exports" / backend,
        log=ctx.out / f"service-{backend}.log",
    )


def probe_files(ctx: Context, label: str) -> str:
    """A consume writes a file: how dear making one is right before a consume run (on this
    host's root filesystem it costs several times more for minutes after many deletions,
    bench/notes.md, session 13), as a note for the run. Beside the exports, removed with
    them at the end."""
    cost = tools.file_cost_us(ctx.out / "exports" / f"probe-{label}")
    return f"a file cost {cost:,.0f} µs just before"


def wait_drain(ctx: Context, result: Result) -> None:
    start = time.monotonic()
    while (size := ctx.db.outbox_size()) and time.monotonic() - start < 30:
        time.sleep(0.05)
    if size:
        result.notes.append(f"outbox still holds {size} entries after 30 s")


def consume_run(
    ctx: Context, service: Service, queue: str, first: int, name: str, seconds: float, probe: str
) -> Result:
    """`consume_prefill` more queued workflows, numbered from `first` (and their messages,
    for the rabbitmq backend), then consumes for `seconds`, noting the file probe `probe`'s
    cost."""
    m, db, backend = ctx.mode, ctx.db, service.backend
    db.prefill(first, first + m.consume_prefill - 1)
    if backend == "rabbitmq":
        fill = ["--start", str(first), "--count", str(m.consume_prefill)]
        tools.broker("fill", "fill", url=ctx.rabbitmq_url, queue=queue, extra_args=fill)
    db.settle()
    cost = probe_files(ctx, probe)
    url = f"{service.url}/workflow/consume"
    result = wrk(ctx, name, url, "consume.lua", CONSUME_CONNECTIONS, seconds)
    if result.extra["statuses"].get(204):
        result.notes.append(f"ran dry ({result.extra['statuses'][204]} x 204)")
    result.notes.append(cost)
    return result


def dequeue_run(ctx: Context, db: dbmod.Database, name: str, seconds: float, index: bool) -> Result:
    """pgbench's raw dequeue on `db`, refilled with `dequeue_prefill` queued rows, with the
    queue index (dropped after) or on the schema as it is."""
    db.reset()
    db.prefill(1, ctx.mode.dequeue_prefill)
    if index:
        db.execute(QUEUE_INDEX)
    db.settle()
    result = tools.pgbench(
        name,
        db.url,
        "dequeue.sql",
        clients=CONSUME_CONNECTIONS,
        seconds=seconds,
        cpus=ctx.load_cpus,
    )
    result.ok = db.count("consumed")  # claims that found a row, not empty transactions
    if db.count("inserted") == 0:
        result.notes.append("ran dry: rate is a lower bound")
    db.execute("DROP INDEX IF EXISTS bench_queue_idx")
    return result

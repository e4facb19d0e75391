"""The phases of one run: raw limits, HTTP scenarios per backend, list scale (the results go
into the Context; verdict.py reads the table and the targets off them)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import db as dbmod
import pika
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


def rabbitmq_version(ctx: Context) -> str:
    connection = pika.BlockingConnection(pika.URLParameters(ctx.rabbitmq_url))
    try:
        props = connection._impl.server_properties  # what the broker announced
        product, version = (props.get(key, "?") for key in ("product", "version"))
        return " ".join(v.decode() if isinstance(v, bytes) else str(v) for v in (product, version))
    finally:
        connection.close()


def raw_postgres(ctx: Context) -> None:
    m, db, cpus = ctx.mode, ctx.db, ctx.load_cpus
    print("raw limits: PostgreSQL (pgbench)", flush=True)
    row = {"data": dbmod.data_text(), "steps": dbmod.steps_literal()}
    for name, script in (
        ("raw insert (pgbench)", "insert.sql"),
        ("raw insert + outbox row (pgbench)", "insert_outbox.sql"),
    ):
        db.reset()
        ctx.add(
            tools.pgbench(
                name,
                db.url,
                script,
                clients=POST_CONNECTIONS,
                seconds=m.raw_seconds,
                cpus=cpus,
                variables=row,
            )
        )
    db.reset()
    db.prefill(1, m.rows_small)
    db.settle()
    rows = {"rows": str(m.rows_small)}
    for name, script in (
        ("raw get one (pgbench)", "get_one.sql"),
        ("raw list page (pgbench)", "list.sql"),
    ):
        ctx.add(
            tools.pgbench(
                name,
                db.url,
                script,
                clients=POST_CONNECTIONS,
                seconds=m.raw_seconds,
                cpus=cpus,
                variables=rows,
            )
        )
    for name, script, index in (
        ("raw dequeue SKIP LOCKED + queue index (pgbench)", "dequeue.sql", QUEUE_INDEX),
        ("raw dequeue, schema as is (pgbench)", "dequeue.sql", None),
    ):
        db.reset()
        db.prefill(1, m.dequeue_prefill)
        if index:
            db.execute(index)
        db.settle()
        result = tools.pgbench(
            name, db.url, script, clients=CONSUME_CONNECTIONS, seconds=m.raw_seconds, cpus=cpus
        )
        result.ok = db.count("consumed")  # claims that found a row, not empty transactions
        if db.count("inserted") == 0:
            result.notes.append("ran dry: rate is a lower bound")
        ctx.add(result)
        db.execute("DROP INDEX IF EXISTS bench_queue_idx")
    db.reset()


def raw_broker(ctx: Context) -> None:
    m = ctx.mode
    print("raw limits: RabbitMQ (pika, quorum queue, persistent messages)", flush=True)
    queue = f"bench-{ctx.run_id}-raw"
    common = {"url": ctx.rabbitmq_url, "queue": queue, "cpus": ctx.load_cpus}
    try:
        report_ = tools.broker(
            "publish", "publish", clients=POST_CONNECTIONS, seconds=m.raw_seconds, **common
        )
        ctx.add(tools.broker_result("raw publish+confirm (pika)", report_))
        depth = report_["ops"]
        for name, command in (
            ("raw get+ack (pika)", "get"),
            ("raw consume, prefetch 32 + ack (pika)", "consume"),
        ):
            if depth < m.broker_depth:
                fill = ["--start", "1", "--count", str(m.broker_depth - depth)]
                tools.broker("fill", "fill", extra_args=fill, **common)
            report_ = tools.broker(
                name, command, clients=CONSUME_CONNECTIONS, seconds=m.raw_seconds, **common
            )
            result = tools.broker_result(name, report_)
            if report_["ops"] >= max(depth, m.broker_depth):
                result.notes.append("emptied the queue: rate is a lower bound")
            ctx.add(result)
            depth = max(depth, m.broker_depth) - report_["ops"]
    finally:
        tools.broker("delete", "delete", **common)


def _wrk(ctx: Context, name: str, url: str, script: str, conns: int, seconds: float) -> Result:
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


def _service(ctx: Context, backend: str, port: int, queue: str) -> Service:
    return Service(
        backend=backend,
        database_url=ctx.db.url,
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


def http(ctx: Context, backend: str, port: int) -> None:
    m, db = ctx.mode, ctx.db
    print(f"HTTP scenarios, {backend} backend (wrk)", flush=True)
    queue = f"bench-{ctx.run_id}-{backend}"
    db.reset()
    db.prefill(1, m.rows_small)
    db.settle()
    service = _service(ctx, backend, port, queue)
    service.start()
    base = service.url
    try:
        post = ctx.add(
            _wrk(
                ctx,
                f"POST /workflow [{backend}]",
                f"{base}/workflow",
                "post.lua",
                POST_CONNECTIONS,
                m.http_seconds,
            )
        )
        if backend == "rabbitmq":
            _check_drain(ctx, post)
        pairs(ctx, backend, service, queue, "POST")
        ctx.add(
            _wrk(
                ctx,
                f"GET /workflow/{{uuid}} [{backend}]",
                f"{base}/workflow",
                "get_one.lua",
                POST_CONNECTIONS,
                m.http_seconds,
            )
        )
        ctx.add(
            _wrk(
                ctx,
                f"GET /workflow?limit=100 [{backend}]",
                f"{base}/workflow?limit=100",
                "list.lua",
                POST_CONNECTIONS,
                m.http_seconds,
            )
        )
        first = m.rows_small + 1
        db.prefill(first, first + m.consume_prefill - 1)
        if backend == "rabbitmq":
            fill = ["--start", str(first), "--count", str(m.consume_prefill)]
            tools.broker("fill", "fill", url=ctx.rabbitmq_url, queue=queue, extra_args=fill)
        db.settle()
        probe = _probe_files(ctx, f"{backend}-table")
        consume = _wrk(
            ctx,
            f"consume [{backend}]",
            f"{base}/workflow/consume",
            "consume.lua",
            CONSUME_CONNECTIONS,
            m.http_seconds,
        )
        if consume.extra["statuses"].get(204):
            consume.notes.append(f"ran dry ({consume.extra['statuses'][204]} x 204)")
        consume.notes.append(probe)
        ctx.add(consume)
        pairs(ctx, backend, service, queue, "consume", first + m.consume_prefill)
        _mixed(ctx, backend, service)
    finally:
        service.stop()
        if backend == "rabbitmq":
            tools.broker("delete", "delete", url=ctx.rabbitmq_url, queue=queue)


def pairs(
    ctx: Context, backend: str, service: Service, queue: str, target: str, first: int = 0
) -> None:
    """A ratio target of `backend` ("POST" or "consume") and its raw limit, run back to
    back `pair_rounds` times, alternating which goes first, right after the target's own
    scenario (so the service's tables and queue are as that scenario left them). A pair's
    ratio compares two runs seconds apart: the host's speed moves by up to ~2x within an
    hour here (bench/notes.md), which one raw run at the start of the run cannot follow.
    The raw runs use a database of their own (`raw_db`) while the service waits idle; the
    verdict takes the median ratio."""
    m, db, raw_db = ctx.mode, ctx.db, ctx.raw_db
    print(f"back-to-back pairs, {target} [{backend}]", flush=True)
    row = {"data": dbmod.data_text(), "steps": dbmod.steps_literal()}
    raw_queue = f"bench-{ctx.run_id}-pairs"
    broker = {"url": ctx.rabbitmq_url, "queue": raw_queue, "cpus": ctx.load_cpus}
    depth = 0

    def raw_insert(name: str) -> Result:
        raw_db.reset()
        return tools.pgbench(
            name,
            raw_db.url,
            "insert.sql",
            clients=POST_CONNECTIONS,
            seconds=m.pair_seconds,
            cpus=ctx.load_cpus,
            variables=row,
        )

    def http_post(name: str) -> Result:
        result = _wrk(
            ctx, name, f"{service.url}/workflow", "post.lua", POST_CONNECTIONS, m.pair_seconds
        )
        if backend == "rabbitmq":
            _wait_drain(ctx, result)  # so that no relay backlog runs into the next run
        return result

    def raw_dequeue(name: str) -> Result:
        raw_db.reset()
        raw_db.prefill(1, m.dequeue_prefill)
        raw_db.execute(QUEUE_INDEX)
        raw_db.settle()
        result = tools.pgbench(
            name,
            raw_db.url,
            "dequeue.sql",
            clients=CONSUME_CONNECTIONS,
            seconds=m.pair_seconds,
            cpus=ctx.load_cpus,
        )
        result.ok = raw_db.count("consumed")
        if raw_db.count("inserted") == 0:
            result.notes.append("ran dry: rate is a lower bound")
        raw_db.execute("DROP INDEX IF EXISTS bench_queue_idx")
        return result

    def raw_get(name: str) -> Result:
        nonlocal depth
        if depth < m.broker_depth:
            fill = ["--start", "1", "--count", str(m.broker_depth - depth)]
            tools.broker("fill", "fill", extra_args=fill, **broker)
            depth = m.broker_depth
        report_ = tools.broker(
            name, "get", clients=CONSUME_CONNECTIONS, seconds=m.pair_seconds, **broker
        )
        depth -= report_["ops"]
        result = tools.broker_result(name, report_)
        if depth <= 0:
            result.notes.append("emptied the queue: rate is a lower bound")
        return result

    def http_consume(name: str) -> Result:
        nonlocal first
        db.prefill(first, first + m.consume_prefill - 1)
        if backend == "rabbitmq":
            fill = ["--start", str(first), "--count", str(m.consume_prefill)]
            tools.broker("fill", "fill", url=ctx.rabbitmq_url, queue=queue, extra_args=fill)
        first += m.consume_prefill
        db.settle()
        probe = _probe_files(ctx, name.rsplit(" ", 3)[-2] + "-" + backend)
        result = _wrk(
            ctx,
            name,
            f"{service.url}/workflow/consume",
            "consume.lua",
            CONSUME_CONNECTIONS,
            m.pair_seconds,
        )
        if result.extra["statuses"].get(204):
            result.notes.append(f"ran dry ({result.extra['statuses'][204]} x 204)")
        result.notes.append(probe)
        return result

    if target == "POST":
        scenario, raw, http_ = f"POST /workflow [{backend}]", raw_insert, http_post
    else:
        raw = raw_dequeue if backend == "postgres" else raw_get
        scenario, http_ = f"consume [{backend}]", http_consume
    broker_raw = raw is raw_get
    if broker_raw:
        tools.broker("declare", "declare", **broker)
    try:
        for i in range(m.pair_rounds):
            runs = [(raw, "raw"), (http_, "http")]
            if i % 2:
                runs.reverse()
            measured = {
                kind: ctx.check(run(f"{scenario} pair {i + 1} {kind}")) for run, kind in runs
            }
            ctx.pairs.setdefault(scenario, []).append((measured["raw"], measured["http"]))
    finally:
        if broker_raw:
            tools.broker("delete", "delete", **broker)


def _probe_files(ctx: Context, label: str) -> str:
    """A consume writes a file: how dear making one is right before a consume run (on this
    host's root filesystem it costs several times more for minutes after many deletions,
    bench/notes.md, session 13), as a note for the run. Beside the exports, removed with
    them at the end."""
    cost = tools.file_cost_us(ctx.out / "exports" / f"probe-{label}")
    return f"a file cost {cost:,.0f} µs just before"


def _wait_drain(ctx: Context, result: Result) -> None:
    start = time.monotonic()
    while (size := ctx.db.outbox_size()) and time.monotonic() - start < 30:
        time.sleep(0.05)
    if size:
        result.notes.append(f"outbox still holds {size} entries after 30 s")


def _check_drain(ctx: Context, post: Result) -> None:
    """After the POST load: how long until the relay has every message confirmed."""
    start = time.monotonic()
    while (size := ctx.db.outbox_size()) and time.monotonic() - start < 30:
        time.sleep(0.05)
    ctx.drain_seconds = time.monotonic() - start if size == 0 else None
    if size:
        post.notes.append(f"outbox still holds {size} entries after 30 s")
    else:
        post.notes.append(f"outbox drained {ctx.drain_seconds:.2f} s after the load")


def _mixed(ctx: Context, backend: str, service: Service) -> None:
    m = ctx.mode
    url = f"{service.url}/workflow"
    name = f"mixed 35/30/10/25 [{backend}]"
    if not m.rss_warmup:
        ctx.add(_wrk(ctx, name, url, "mixed.lua", POST_CONNECTIONS, m.mixed_seconds))
        return
    _wrk(ctx, name, url, "mixed.lua", POST_CONNECTIONS, m.rss_warmup)  # warm-up
    samples: list[dict[int, int]] = [service.rss_kib()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(5):
            samples.append(service.rss_kib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    env = {"BENCH_BODY": str(BODY), "BENCH_ROWS": str(m.rows_small)}
    result = tools.wrk(
        name,
        url,
        "mixed.lua",
        connections=POST_CONNECTIONS,
        seconds=m.mixed_seconds,
        cpus=ctx.load_cpus,
        env=env,
    )
    stop.set()
    sampler.join()
    samples.append(service.rss_kib())
    growth = {
        pid: (samples[-1][pid] - start) / start
        for pid, start in samples[0].items()
        if pid in samples[-1]
    }
    ctx.rss[backend] = {"samples_kib": samples, "growth": growth}
    worst = max(growth.values(), default=0.0)
    result.notes.append(f"worker RSS {samples[0]} → {samples[-1]} KiB (max {worst:+.1%})")
    ctx.add(result)


def list_scale(ctx: Context, port: int) -> None:
    m, db = ctx.mode, ctx.db
    print("GET /workflow?limit=100 at two table sizes (postgres backend)", flush=True)
    db.reset()
    db.prefill(1, m.rows_small)
    db.settle()
    service = _service(ctx, "postgres", port, f"bench-{ctx.run_id}-list")
    service.start()
    base = service.url
    try:
        for rows in (m.rows_small, m.rows_big):
            if rows != m.rows_small:
                db.prefill(m.rows_small + 1, rows)
                db.settle()
            ctx.add(
                _wrk(
                    ctx,
                    f"list first page @ {rows:,} rows",
                    f"{base}/workflow?limit=100",
                    "list.lua",
                    LIST_SCALE_CONNECTIONS,
                    m.list_seconds,
                )
            )
            ctx.add(
                _wrk(
                    ctx,
                    f"list keyset page (after=) @ {rows:,} rows",
                    f"{base}/workflow",
                    "list_deep.lua",
                    LIST_SCALE_CONNECTIONS,
                    m.list_seconds,
                )
            )
    finally:
        service.stop()

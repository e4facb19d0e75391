"""The raw limits: what PostgreSQL (pgbench) and RabbitMQ (pika) do alone, at the
concurrency of the HTTP scenarios they are compared with."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import db as dbmod
import pika
import tools
from runs import CONSUME_CONNECTIONS, POST_CONNECTIONS, dequeue_run

from workflows.domain.model import steps_size

if TYPE_CHECKING:
    from bench import Context


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
    data = dbmod.data_text()
    steps = dbmod.body()["steps"]
    row = {"data": data, "size": str(len(data.encode())), "steps": dbmod.steps_literal()}
    row["steps_size"] = str(steps_size(tuple(steps)))

    def run(name: str, script: str, variables: dict[str, str]) -> None:
        seconds = m.raw_seconds
        ctx.add(
            tools.pgbench(
                name,
                db.url,
                script,
                clients=POST_CONNECTIONS,
                seconds=seconds,
                cpus=cpus,
                variables=variables,
            )
        )

    for name, script in (
        ("raw insert (pgbench)", "insert.sql"),
        ("raw insert + outbox row (pgbench)", "insert_outbox.sql"),
    ):
        db.reset()
        run(name, script, row)
    db.reset()
    db.prefill(1, m.rows_small)
    db.settle()
    rows = {"rows": str(m.rows_small)}
    run("raw get one (pgbench)", "get_one.sql", rows)
    run("raw list page (pgbench)", "list.sql", rows)
    for name, index in (
        ("raw dequeue SKIP LOCKED + queue index (pgbench)", True),
        ("raw dequeue, schema as is (pgbench)", False),
    ):
        ctx.add(dequeue_run(ctx, db, name, m.raw_seconds, index))
    db.reset()


def raw_broker(ctx: Context) -> None:
    m = ctx.mode
    print("raw limits: RabbitMQ (pika, quorum queue, persistent messages)", flush=True)
    queue = f"bench-{ctx.run_id}-raw"
    broker = functools.partial(tools.broker, url=ctx.rabbitmq_url, queue=queue, cpus=ctx.load_cpus)
    try:
        report_ = broker("publish", "publish", clients=POST_CONNECTIONS, seconds=m.raw_seconds)
        ctx.add(tools.broker_result("raw publish+confirm (pika)", report_))
        depth = report_["ops"]
        for name, command in (
            ("raw get+ack (pika)", "get"),
            ("raw consume, prefetch 32 + ack (pika)", "consume"),
        ):
            if depth < m.broker_depth:
                fill = ["--start", "1", "--count", str(m.broker_depth - depth)]
                broker("fill", "fill", extra_args=fill)
            report_ = broker(name, command, clients=CONSUME_CONNECTIONS, seconds=m.raw_seconds)
            result = tools.broker_result(name, report_)
            if report_["ops"] >= max(depth, m.broker_depth):
                result.notes.append("emptied the queue: rate is a lower bound")
            ctx.add(result)
            depth = max(depth, m.broker_depth) - report_["ops"]
    finally:
        broker("delete", "delete")

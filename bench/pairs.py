"""The ratio targets' pairs: each target's HTTP scenario and its raw limit, back to back."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import db as dbmod
import tools
from runs import CONSUME_CONNECTIONS, POST_CONNECTIONS, consume_run, dequeue_run, wait_drain, wrk
from service import Service
from tools import Result

if TYPE_CHECKING:
    from bench import Context


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
    m, raw_db = ctx.mode, ctx.raw_db
    print(f"back-to-back pairs, {target} [{backend}]", flush=True)
    row = {"data": dbmod.data_text(), "steps": dbmod.steps_literal()}
    raw_queue = f"bench-{ctx.run_id}-pairs"
    broker = functools.partial(
        tools.broker, url=ctx.rabbitmq_url, queue=raw_queue, cpus=ctx.load_cpus
    )
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
        result = wrk(
            ctx, name, f"{service.url}/workflow", "post.lua", POST_CONNECTIONS, m.pair_seconds
        )
        if backend == "rabbitmq":
            wait_drain(ctx, result)  # so that no relay backlog runs into the next run
        return result

    def raw_dequeue(name: str) -> Result:
        return dequeue_run(ctx, raw_db, name, m.pair_seconds, index=True)

    def raw_get(name: str) -> Result:
        nonlocal depth
        if depth < m.broker_depth:
            fill = ["--start", "1", "--count", str(m.broker_depth - depth)]
            broker("fill", "fill", extra_args=fill)
            depth = m.broker_depth
        report_ = broker(name, "get", clients=CONSUME_CONNECTIONS, seconds=m.pair_seconds)
        depth -= report_["ops"]
        result = tools.broker_result(name, report_)
        if depth <= 0:
            result.notes.append("emptied the queue: rate is a lower bound")
        return result

    def http_consume(name: str) -> Result:
        nonlocal first
        first += m.consume_prefill
        probe = name.rsplit(" ", 3)[-2] + "-" + backend
        return consume_run(
            ctx, service, queue, first - m.consume_prefill, name, m.pair_seconds, probe
        )

    if target == "POST":
        scenario, raw, http_ = f"POST /workflow [{backend}]", raw_insert, http_post
    else:
        raw = raw_dequeue if backend == "postgres" else raw_get
        scenario, http_ = f"consume [{backend}]", http_consume
    broker_raw = raw is raw_get
    if broker_raw:
        broker("declare", "declare")
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
            broker("delete", "delete")

"""The HTTP phases of one run: the scenarios per backend, each ratio target with its pairs
(pairs.py), and the list at two table sizes. The raw limits are raw.py's. The results go
into the Context; verdict.py reads the table and the targets off them."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import tools
from pairs import pairs
from runs import (
    BODY,
    LIST_SCALE_CONNECTIONS,
    POST_CONNECTIONS,
    consume_run,
    make_service,
    wrk,
)
from service import Service
from tools import Result

if TYPE_CHECKING:
    from bench import Context


def http(ctx: Context, backend: str, port: int) -> None:
    m, db = ctx.mode, ctx.db
    print(f"HTTP scenarios, {backend} backend (wrk)", flush=True)
    queue = f"bench-{ctx.run_id}-{backend}"
    db.reset()
    db.prefill(1, m.rows_small)
    db.settle()
    service = make_service(ctx, backend, port, queue)
    service.start()
    base = service.url
    try:
        post = ctx.add(
            wrk(
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
            wrk(
                ctx,
                f"GET /workflow/{{uuid}} [{backend}]",
                f"{base}/workflow",
                "get_one.lua",
                POST_CONNECTIONS,
                m.http_seconds,
            )
        )
        ctx.add(
            wrk(
                ctx,
                f"GET /workflow?limit=100 [{backend}]",
                f"{base}/workflow?limit=100",
                "list.lua",
                POST_CONNECTIONS,
                m.http_seconds,
            )
        )
        first = m.rows_small + 1
        name, probe = f"consume [{backend}]", f"{backend}-table"
        ctx.add(consume_run(ctx, service, queue, first, name, m.http_seconds, probe))
        pairs(ctx, backend, service, queue, "consume", first + m.consume_prefill)
        _mixed(ctx, backend, service)
    finally:
        service.stop()
        if backend == "rabbitmq":
            tools.broker("delete", "delete", url=ctx.rabbitmq_url, queue=queue)


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
        ctx.add(wrk(ctx, name, url, "mixed.lua", POST_CONNECTIONS, m.mixed_seconds))
        return
    wrk(ctx, name, url, "mixed.lua", POST_CONNECTIONS, m.rss_warmup)  # warm-up
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


def list_scale(ctx: Context, port: int, small_port: int) -> None:
    """The list pages at `rows_small` rows, then at `rows_big` in the same table; then the
    first page at both sizes back to back, `pair_rounds` times, alternating which goes
    first: the big table is the run's database, the small one the raw runs' database
    (done with by then), each with a service of its own. The verdict takes the median of
    the pairs' p50 ratios: one run of each size, minutes apart, follows the host."""
    m, db = ctx.mode, ctx.db
    print("GET /workflow?limit=100 at two table sizes (postgres backend)", flush=True)
    db.reset()
    db.prefill(1, m.rows_small)
    db.settle()
    service = make_service(ctx, "postgres", port, f"bench-{ctx.run_id}-list")
    service.start()
    base = service.url
    try:
        for rows in (m.rows_small, m.rows_big):
            if rows != m.rows_small:
                db.prefill(m.rows_small + 1, rows)
                db.settle()
            ctx.add(
                wrk(
                    ctx,
                    f"list first page @ {rows:,} rows",
                    f"{base}/workflow?limit=100",
                    "list.lua",
                    LIST_SCALE_CONNECTIONS,
                    m.list_seconds,
                )
            )
            ctx.add(
                wrk(
                    ctx,
                    f"list keyset page (after=) @ {rows:,} rows",
                    f"{base}/workflow",
                    "list_deep.lua",
                    LIST_SCALE_CONNECTIONS,
                    m.list_seconds,
                )
            )
        list_pairs(ctx, service, small_port)
    finally:
        service.stop()


def list_pairs(ctx: Context, big: Service, port: int) -> None:
    m, small_db = ctx.mode, ctx.raw_db
    print("back-to-back pairs, list first page at two table sizes", flush=True)
    small_db.reset()
    small_db.prefill(1, m.rows_small)
    small_db.settle()
    small = make_service(ctx, "postgres", port, f"bench-{ctx.run_id}-list-small", small_db)
    small.start()
    try:
        for i in range(m.pair_rounds):
            runs = [(small, m.rows_small), (big, m.rows_big)]
            if i % 2:
                runs.reverse()
            measured = {
                rows: ctx.check(
                    wrk(
                        ctx,
                        f"list first page @ {rows:,} rows pair {i + 1}",
                        f"{service.url}/workflow?limit=100",
                        "list.lua",
                        LIST_SCALE_CONNECTIONS,
                        m.pair_seconds,
                    )
                )
                for service, rows in runs
            }
            ctx.list_pairs.append((measured[m.rows_small], measured[m.rows_big]))
    finally:
        small.stop()

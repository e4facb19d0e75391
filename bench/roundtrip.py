"""What one PostgreSQL round trip costs the worker's CPU, through each layer, on this machine.

    .venv/bin/python bench/roundtrip.py [--rounds 3] [--count 4000]

One process, one connection, one statement at a time (no concurrency: this measures CPU,
not throughput), in alternating rounds on a scratch database:
- `SELECT 1` through libpq alone (psycopg.pq, blocking), through psycopg's blocking
  connection, and through psycopg's AsyncConnection on uvloop, as the service uses it;
- a consume's claim transaction as GroupClaim runs it for a batch of 3: `BEGIN`, the
  claim-and-mark statement (workflows.adapters.postgres.claims.TAKE_OLDEST_INSERTED),
  rows turned into Workflows, `COMMIT`, through psycopg's AsyncConnection; and the same
  three round trips through libpq's asynchronous calls driven by the uvloop loop (prepared
  statement, rows left as bytes): the least any asyncio driver could spend on them.
It prints the CPU (user + system of this process) and wall time per round trip or per
claim transaction, per round, then the medians. Not part of `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import db as dbmod
import psycopg
import uvloop
from psycopg import pq

from workflows.adapters.postgres.claims import TAKE_OLDEST_INSERTED
from workflows.adapters.postgres.database import session_options
from workflows.adapters.postgres.rows import as_workflow

CLAIMS = 3  # a claim batch's size under make bench's consume load (2-3 on average)
SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def timed(count: int, run: Callable[[], None]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return (time.process_time() - cpu) * 1e6 / count, (time.perf_counter() - wall) * 1e6 / count


def libpq_select(url: str, count: int) -> tuple[float, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        pgconn = conn.pgconn

        def run() -> None:
            for _ in range(count):
                pgconn.send_query(b"SELECT 1")
                pgconn.flush()
                while pgconn.get_result() is not None:  # blocks until each result is in
                    pass

        return timed(count, run)


def psycopg_select(url: str, count: int) -> tuple[float, float]:
    with psycopg.connect(url, autocommit=True) as conn:

        def run() -> None:
            for _ in range(count):
                conn.execute("SELECT 1").fetchone()

        return timed(count, run)


def on_uvloop(main: Coroutine[Any, Any, tuple[float, float]]) -> tuple[float, float]:
    return uvloop.run(main)


async def async_select(url: str, count: int) -> tuple[float, float]:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        await (await conn.execute("SELECT 1")).fetchone()
    result = (time.process_time() - cpu) * 1e6 / count, (time.perf_counter() - wall) * 1e6 / count
    await conn.close()
    return result


async def async_claims(url: str, count: int) -> tuple[float, float]:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True, options=session_options(url))
    now = datetime.now(UTC)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        async with conn.transaction():
            cursor = await conn.execute(TAKE_OLDEST_INSERTED, (now, uuid.uuid4(), CLAIMS))
            taken = [as_workflow(row) for row in await cursor.fetchall()]
            assert len(taken) == CLAIMS, "the scratch queue ran dry"
    result = (time.process_time() - cpu) * 1e6 / count, (time.perf_counter() - wall) * 1e6 / count
    await conn.close()
    return result


async def libpq_claims(url: str, count: int) -> tuple[float, float]:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True, options=session_options(url))
    pgconn, loop = conn.pgconn, asyncio.get_running_loop()
    pgconn.nonblocking = 1

    async def ready(add: Any, remove: Any) -> None:
        """Until the socket is readable (add_reader) or writable (add_writer)."""
        event = loop.create_future()
        add(pgconn.socket, event.set_result, None)
        try:
            await event
        finally:
            remove(pgconn.socket)

    async def results() -> list[pq.abc.PGresult]:
        while pgconn.flush():
            await ready(loop.add_writer, loop.remove_writer)
        got: list[pq.abc.PGresult] = []
        while True:
            pgconn.consume_input()
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    return got
                if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
                    raise RuntimeError(result.error_message.decode())
                got.append(result)
            await ready(loop.add_reader, loop.remove_reader)

    pgconn.send_prepare(b"take", (TAKE_OLDEST_INSERTED % ("$1", "$2", "$3")).encode())
    await results()
    stamp = datetime.now(UTC).isoformat().encode()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        pgconn.send_query(b"BEGIN")
        await results()
        params = [stamp, str(uuid.uuid4()).encode(), str(CLAIMS).encode()]
        pgconn.send_query_prepared(b"take", params)
        (claimed,) = await results()
        rows = [
            [claimed.get_value(row, col) for col in range(claimed.nfields)]
            for row in range(claimed.ntuples)
        ]
        assert len(rows) == CLAIMS, "the scratch queue ran dry"
        pgconn.send_query(b"COMMIT")
        await results()
    result = (time.process_time() - cpu) * 1e6 / count, (time.perf_counter() - wall) * 1e6 / count
    await conn.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=4000)
    args = parser.parse_args()
    db = dbmod.Database(SERVER, "ft_roundtrip")
    db.create()
    try:
        from workflows.adapters.postgres import migrate

        migrate(db.url)
        db.prefill(1, 2 * args.rounds * args.count * CLAIMS + 1000)
        db.settle()
        cases: dict[str, Callable[[], tuple[float, float]]] = {
            "SELECT 1, libpq": lambda: libpq_select(db.url, args.count),
            "SELECT 1, psycopg": lambda: psycopg_select(db.url, args.count),
            "SELECT 1, psycopg async": lambda: on_uvloop(async_select(db.url, args.count)),
            "claim of 3, psycopg async": lambda: on_uvloop(async_claims(db.url, args.count)),
            "claim of 3, libpq async": lambda: on_uvloop(libpq_claims(db.url, args.count)),
        }
        seen: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for number in range(1, args.rounds + 1):
            for name, case in cases.items():
                cpu, wall = case()
                seen[name].append((cpu, wall))
                print(f"round {number}: {name:27} CPU {cpu:5.0f} µs, wall {wall:5.0f} µs")
        print("medians:")
        for name, runs in seen.items():
            cpu = statistics.median(run[0] for run in runs)
            wall = statistics.median(run[1] for run in runs)
            print(f"  {name:27} CPU {cpu:5.0f} µs, wall {wall:5.0f} µs")
    finally:
        db.drop()


if __name__ == "__main__":
    main()

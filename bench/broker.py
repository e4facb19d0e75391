"""The raw limits of RabbitMQ, measured with pika the way the service uses it.

    python bench/broker.py publish --clients 32 --seconds 10   # publish + wait for the confirm
    python bench/broker.py get --clients 8 --seconds 10       # basic.get + basic.ack
    python bench/broker.py consume --clients 8 --seconds 10   # basic.consume, prefetch, ack each
    python bench/broker.py fill --count 50000                 # put prefilled uuids on a queue
    python bench/broker.py declare                            # declare the queue
    python bench/broker.py delete                             # delete the queue

Every client is a process of its own with its own connection (pika is blocking: threads
would share one GIL), on a durable quorum queue with persistent messages, as the service
declares it. Each command prints one JSON line: ops, seconds, rate, p50/p99 in ms.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from typing import Any

import pika

PERSISTENT = pika.BasicProperties(delivery_mode=2, content_type="text/plain")
QUORUM = {"x-queue-type": "quorum"}


def prefilled_uuid(n: int) -> str:
    """The uuid of the n-th prefilled workflow (bench/sql.py makes the same in SQL)."""
    return f"01000000-0000-7000-8000-{n:012x}"


def channel(url: str, queue: str, *, passive: bool = False) -> tuple[Any, Any]:
    """A channel on `queue`, declared as the service declares it; `passive` only checks
    that it exists (the service's queue, whose arguments are the service's business)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    ch = connection.channel()
    ch.queue_declare(queue, passive=passive, durable=True, arguments=QUORUM)
    return connection, ch


def _publish(ch: Any, queue: str, deadline: float, index: int) -> tuple[int, list[float], int]:
    ch.confirm_delivery()
    latencies: list[float] = []
    n = 0
    while (start := time.perf_counter()) < deadline:
        body = prefilled_uuid(index * 10_000_000 + n).encode()
        ch.basic_publish("", queue, body, PERSISTENT, mandatory=True)  # returns once confirmed
        latencies.append(time.perf_counter() - start)
        n += 1
    return n, latencies, 0


def _get(ch: Any, queue: str, deadline: float, index: int) -> tuple[int, list[float], int]:
    latencies: list[float] = []
    empty = 0
    while (start := time.perf_counter()) < deadline:
        method, _properties, _body = ch.basic_get(queue, auto_ack=False)
        if method is None:
            empty += 1
            continue
        ch.basic_ack(method.delivery_tag)
        latencies.append(time.perf_counter() - start)
    return len(latencies), latencies, empty


def _consume(
    ch: Any, queue: str, deadline: float, index: int, prefetch: int
) -> tuple[int, list[float], int]:
    ch.basic_qos(prefetch_count=prefetch)
    count = 0

    def on_message(channel: Any, method: Any, _properties: Any, _body: bytes) -> None:
        nonlocal count
        channel.basic_ack(method.delivery_tag)
        count += 1

    ch.basic_consume(queue, on_message)
    while time.perf_counter() < deadline:
        ch.connection.process_data_events(time_limit=0.05)
    return count, [], 0


def _client(args: tuple[str, str, str, float, float, int, int]) -> tuple[int, list[float], int]:
    try:
        return _run_client(*args)
    except Exception as error:  # pika's errors do not unpickle: pass on their text
        raise RuntimeError(f"client {args[5]}: {error!r}") from None


def _run_client(
    url: str, queue: str, command: str, start_at: float, seconds: float, index: int, prefetch: int
) -> tuple[int, list[float], int]:
    connection, ch = channel(url, queue)
    try:
        time.sleep(max(0.0, start_at - time.time()))  # all clients start together
        deadline = time.perf_counter() + seconds
        if command == "publish":
            return _publish(ch, queue, deadline, index)
        if command == "get":
            return _get(ch, queue, deadline, index)
        return _consume(ch, queue, deadline, index, prefetch)
    finally:
        connection.close()


def measure(url: str, queue: str, command: str, clients: int, seconds: float, prefetch: int) -> Any:
    start_at = time.time() + 1.0 + 0.05 * clients  # time for every client to connect
    jobs = [(url, queue, command, start_at, seconds, i, prefetch) for i in range(clients)]
    with multiprocessing.get_context("fork").Pool(clients) as pool:
        results = pool.map_async(_client, jobs).get(timeout=start_at - time.time() + seconds + 60)
    ops = sum(r[0] for r in results)
    latencies = sorted(x for r in results for x in r[1])

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1e3, 3)

    return {
        "command": command,
        "clients": clients,
        "ops": ops,
        "seconds": seconds,
        "rate": round(ops / seconds, 1),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "empty_gets": sum(r[2] for r in results),
    }


def fill(url: str, queue: str, start: int, count: int, prefetch: int) -> Any:
    """Publish the uuids of prefilled workflows start..start+count-1 (no confirms: fast),
    then wait until the broker holds them all. The queue must exist. A running service's
    prefetching consumers take up to `prefetch` each meanwhile: those are not counted
    ready (AMQP tells only the ready messages and the consumers)."""
    connection, ch = channel(url, queue, passive=True)
    try:
        before = ch.queue_declare(queue, passive=True).method.message_count
        for n in range(start, start + count):
            ch.basic_publish("", queue, prefilled_uuid(n).encode(), PERSISTENT)
        deadline = time.monotonic() + 60
        while True:
            method = ch.queue_declare(queue, passive=True).method
            depth, expected = method.message_count, before + count
            if depth >= expected - method.consumer_count * prefetch:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"fill: the queue holds {depth}, expected {expected}")
            connection.sleep(0.1)
        return {"command": "fill", "queue": queue, "depth": depth}
    finally:
        connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "command", choices=["publish", "get", "consume", "fill", "declare", "delete"]
    )
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--queue", default="bench-raw")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--prefetch", type=int, default=32)
    parser.add_argument("--start", type=int, default=1, help="fill: first prefilled number")
    parser.add_argument("--count", type=int, default=10_000, help="fill: how many")
    args = parser.parse_args(argv)
    if args.command == "fill":
        result = fill(args.url, args.queue, args.start, args.count, args.prefetch)
    elif args.command == "declare":
        connection, _ = channel(args.url, args.queue)
        connection.close()
        result = {"command": "declare", "queue": args.queue}
    elif args.command == "delete":
        connection = pika.BlockingConnection(pika.URLParameters(args.url))
        channel_ = connection.channel()
        for name in (args.queue, f"{args.queue}.dead"):  # and the service's dead letters
            channel_.queue_delete(name)
        connection.close()
        result = {"command": "delete", "queue": args.queue}
    else:
        result = measure(
            args.url, args.queue, args.command, args.clients, args.seconds, args.prefetch
        )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

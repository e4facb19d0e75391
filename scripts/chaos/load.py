"""The load: POST clients and consume clients, each recording what the server answered.

Every POST carries a unique marker in its `data`, so a workflow stored twice shows up as two
rows with one marker. A consume that got 200 records the workflow's uuid (X-Workflow-UUID)
and a digest of its CSV body, checked after the run against the export file and
`GET /workflow/{uuid}/csv`.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field

import httpx

from scripts.chaos.services import HOST

REQUEST_TIMEOUT = 10.0
"""Seconds a client waits for an answer (a pooled connection waits up to 5 s, POST up to
CONFIRM_TIMEOUT for the broker when that is set): past this it counts the call as
unanswered."""
ERROR_PAUSE = 0.1
EMPTY_PAUSE = 0.05
CONSUME = "/workflow/consume"
RAW_CONSUME = "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass
class Ledger:
    """What the clients saw, for one target."""

    tag: str
    posted: dict[str, str] = field(default_factory=dict)  # marker -> uuid, for every 201
    post_retries: int = 0  # POSTs sent again with the same Idempotency-Key
    post_replayed: int = 0  # 201s with Idempotent-Replayed: the first try had been stored
    post_refused: dict[str, int] = field(default_factory=dict)  # marker -> other status
    post_unanswered: set[str] = field(default_factory=set)  # timeout, connection error
    consumed: dict[str, list[str]] = field(default_factory=dict)  # uuid -> digest per 200
    consume_empty: int = 0  # 204
    consume_failed: int = 0  # answered, but not 200/204 (5xx mostly)
    consume_unanswered: int = 0  # timeouts and connection errors
    consume_abandoned: int = 0  # calls a client dropped on purpose (disconnect scenario)
    statuses: Counter[str] = field(default_factory=Counter)  # "POST 503": n
    errors: Counter[str] = field(default_factory=Counter)  # "consume ReadTimeout": n
    oddities: list[str] = field(default_factory=list)  # answers that break the API contract

    @property
    def consume_calls_without_result(self) -> int:
        """Calls that may have consumed a workflow without telling us which."""
        return self.consume_failed + self.consume_unanswered + self.consume_abandoned

    @property
    def server_errors(self) -> int:
        return sum(n for key, n in self.statuses.items() if key.split()[-1].startswith("5"))

    @property
    def transport_errors(self) -> int:
        return sum(self.errors.values())


def new_client(base_url: str, timeout: float = REQUEST_TIMEOUT) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
        limits=httpx.Limits(max_connections=1),
        trust_env=False,  # never through a proxy: our traffic stays on 127.0.0.1
    )


def _body(marker: str, client: int, seq: int) -> bytes:
    # Numbers as text the server must keep verbatim, a nested object and an array, so
    # the CSV comparison covers flattening too.
    return (
        f'{{"data": {{"chaos": "{marker}", "client": {client}, "seq": {seq}, '
        f'"amount": 12.50, "address": {{"city": "Oslo", "zip": "0150"}}, "lines": [1, 2.0]}}, '
        f'"steps": ["chaos"]}}'
    ).encode()


async def poster(
    base_url: str, ledger: Ledger, client_id: int, stop: asyncio.Event, *, idempotent: bool
) -> None:
    """POST new workflows one after the other. An `idempotent` client sends its marker as
    the Idempotency-Key and, like a careful client, retries a POST that got no answer or a
    5xx until it gets an answer; the others never retry (so a POST that failed after its
    commit shows up as a row without a 201)."""
    seq = 0
    async with new_client(base_url) as client:
        while not stop.is_set():
            seq += 1
            marker = f"{ledger.tag}:{client_id}:{seq}"
            headers = {"Content-Type": "application/json"}
            if idempotent:
                headers["Idempotency-Key"] = marker
            body = _body(marker, client_id, seq)
            while not await _post_once(client, ledger, marker, body, headers) and idempotent:
                if stop.is_set():
                    break
                ledger.post_retries += 1


async def _post_once(
    client: httpx.AsyncClient, ledger: Ledger, marker: str, body: bytes, headers: dict[str, str]
) -> bool:
    """One POST, recorded; False when it should be retried (no answer, or a 5xx)."""
    try:
        response = await client.post("/workflow", content=body, headers=headers)
    except httpx.TransportError as error:
        ledger.post_unanswered.add(marker)
        ledger.errors[f"POST {type(error).__name__}"] += 1
        await asyncio.sleep(ERROR_PAUSE)
        return False
    ledger.statuses[f"POST {response.status_code}"] += 1
    if response.status_code == 201:
        ledger.posted[marker] = response.json()["uuid"]
        ledger.post_unanswered.discard(marker)
        ledger.post_refused.pop(marker, None)
        if response.headers.get("idempotent-replayed") == "true":
            ledger.post_replayed += 1
        return True
    ledger.post_refused[marker] = response.status_code
    await asyncio.sleep(ERROR_PAUSE)
    return response.status_code < 500


async def consume_once(client: httpx.AsyncClient, ledger: Ledger, wait: float = 0) -> int | None:
    """One consume call (a long poll of up to `wait` s), recorded; its status, or None
    when no answer came."""
    try:
        response = await client.post(CONSUME, params={"wait": wait} if wait else None)
    except httpx.TransportError as error:
        ledger.consume_unanswered += 1
        ledger.errors[f"consume {type(error).__name__}"] += 1
        return None
    return _record(response, ledger)


async def consumer(
    base_url: str, ledger: Ledger, stop: asyncio.Event, *, long_poll: float = 0
) -> None:
    """Consume in a loop: with `long_poll`, each call waits up to that long for work."""
    async with new_client(base_url) as client:
        while not stop.is_set():
            status = await consume_once(client, ledger, long_poll)
            if status == 204:
                await asyncio.sleep(EMPTY_PAUSE)
            elif status != 200:
                await asyncio.sleep(ERROR_PAUSE)


async def disconnector(base_url: str, ledger: Ledger, stop: asyncio.Event) -> None:
    """Consume calls dropped mid-request: half send the request (a third of them a long
    poll) on a raw socket and close it (a reset) at once or within 20 ms; half use a client
    timeout of 1 to 30 ms. A call answered in time is recorded like any other."""
    host, port = base_url.removeprefix("http://").split(":")
    rng = random.Random()
    async with new_client(base_url) as client:
        while not stop.is_set():
            if rng.random() < 0.5:
                await _drop_raw(host, int(port), rng, ledger)
                continue
            try:
                response = await client.post(CONSUME, timeout=rng.uniform(0.001, 0.03))
            except httpx.TransportError:
                ledger.consume_abandoned += 1
                continue
            _record(response, ledger)  # answered within the tiny timeout: a normal call


async def _drop_raw(host: str, port: int, rng: random.Random, ledger: Ledger) -> None:
    """Send a consume request on a socket of our own, then reset the connection."""
    try:
        _reader, writer = await asyncio.open_connection(host, port)
    except OSError as error:
        ledger.errors[f"consume {type(error).__name__}"] += 1
        ledger.consume_unanswered += 1  # nothing was sent: it consumed nothing
        await asyncio.sleep(ERROR_PAUSE)
        return
    path = rng.choice((CONSUME, CONSUME, f"{CONSUME}?wait=2"))  # a third of them long-poll
    writer.write(RAW_CONSUME.format(path, HOST).encode())
    await writer.drain()
    await asyncio.sleep(rng.choice((0, 0, 0.001, 0.005, 0.02)))
    writer.transport.abort()
    ledger.consume_abandoned += 1


def _record(response: httpx.Response, ledger: Ledger) -> int:
    status = response.status_code
    ledger.statuses[f"consume {status}"] += 1
    if status == 200:
        uuid = response.headers.get("x-workflow-uuid")
        if uuid is None:
            ledger.oddities.append("consume 200 without X-Workflow-UUID")
        else:
            digest = hashlib.sha256(response.content).hexdigest()
            ledger.consumed.setdefault(uuid, []).append(digest)
    elif status == 204:
        ledger.consume_empty += 1
    else:
        ledger.consume_failed += 1
    return status

"""The connection pool, and the one place where database failures become 503s."""

from __future__ import annotations

import asyncio
import math
import select
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import LiteralString, TypeAlias, TypeVar

import psycopg
from psycopg.abc import PQGen
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from workflows.domain.errors import DependencyUnavailable

RV = TypeVar("RV")

ACQUIRE_TIMEOUT = 5.0
"""Seconds a caller waits for a pooled connection before the database counts as down."""
CONNECT_TIMEOUT = 5
"""libpq's connect_timeout (whole seconds), so an unreachable host cannot stall the pool."""
ASK_PAUSE = 0.2
"""Seconds between two tries of `ask_patiently`."""
VERIFY_WITHIN = 5.0
"""Seconds a statement whose answer was lost keeps asking what became of it (as long as a
caller waits for a pooled connection) before its callers get the 503."""
LOCK_TIMEOUT = 5.0
"""Seconds a statement waits for a lock another session holds (an operator's `ALTER
TABLE` or `LOCK`, a stuck transaction) before PostgreSQL cancels it: its caller gets a
503 then, as for a connection, instead of hanging for as long as the lock is held."""
QUERY_TIMEOUT = 10.0
"""Seconds a statement's round trip may take before its connection is given up and its
caller gets a 503: a server that stops answering without closing the connection (hung or
frozen, stopped with SIGSTOP, behind a network that drops packets) would otherwise hold
the call for as long as it does. Above LOCK_TIMEOUT, so that a statement waiting for a
lock is cancelled by the server first, and is known not to have committed."""
SOME_TIME = 1.0
"""Seconds a probe's round trip is given at least, however late its connection came."""
WAIT_INTERVAL = 0.1
"""psycopg's own: how often a wait for the server wakes to check for interruptions."""
RECONNECT_TIMEOUT = 10.0
"""How long the pool retries a failed connection, with backoff, before giving up; the next
request then tries again at once. Kept short so the pool notices a returning database
within seconds rather than after a backoff of minutes."""


class BoundedConnection(psycopg.AsyncConnection[TupleRow]):
    """A pooled connection whose every round trip (a statement, a COMMIT) is answered
    within QUERY_TIMEOUT, or the connection is closed and the call fails with
    `NoAnswer`, which `connection()` turns into a 503 like any other lost connection.

    psycopg runs every round trip of a connection through `wait`, which can give up
    after a timeout; its own wait wakes every WAIT_INTERVAL anyway, so the deadline costs
    nothing more than a clock read. Closing is the only safe way out: what the server
    makes of the statement is unknown (`connection()`'s callers that wrote check what
    was left, as for a connection lost with its answer). A wait given its own timeout
    (LISTEN's `notifies`) keeps it."""

    query_timeout: float | None = None
    """This connection's deadline for a round trip while set, instead of QUERY_TIMEOUT."""

    async def wait(
        self,
        gen: PQGen[RV],
        interval: float = WAIT_INTERVAL,
        timeout: float | None = None,  # noqa: ASYNC109 (psycopg's signature, overridden)
    ) -> RV:
        limit = timeout
        if limit is None:
            limit = QUERY_TIMEOUT if self.query_timeout is None else self.query_timeout
        try:
            return await super().wait(gen, interval, limit)
        except psycopg.errors._WaitTimeout as error:  # what psycopg raises for its timeout
            if timeout is not None:
                raise
            self.pgconn.finish()  # broken, not closed: the pool discards it
            raise NoAnswer(f"no answer from the database within {limit:g} s") from error


class NoAnswer(psycopg.OperationalError):
    """A round trip took more than QUERY_TIMEOUT; its connection was closed."""


Connection: TypeAlias = BoundedConnection
Pool: TypeAlias = AsyncConnectionPool[Connection]


def session_options(url: str) -> str:
    """The URL's `options`, with the session time zone set to UTC and `lock_timeout` to
    LOCK_TIMEOUT, unless they set their own.

    UTC: timestamps then load as datetimes in `timezone.utc`, which costs psycopg and the
    domain (UTC throughout) less than converting from a zoneinfo zone (bench/notes.md).
    No statement depends on the session's zone, and nothing reads a timestamp's text."""
    given = str(conninfo_to_dict(url).get("options") or "")
    options = [given] if given else []
    if "timezone" not in given.lower():
        options.append("-c TimeZone=UTC")
    if "lock_timeout" not in given.lower():
        options.append(f"-c lock_timeout={round(LOCK_TIMEOUT * 1000)}")
    return " ".join(options)


KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
"""libpq's TCP keepalives for the service's connections: an idle connection is probed
after 30 s of silence, which keeps NAT and firewall state from forgetting it (cloud load
balancers drop idle flows after 4 minutes and more), and one whose peer is gone is found
dead within 60 s and replaced before use (`closed_by_server`), instead of costing its next
request a query timeout."""


def keepalives(url: str) -> dict[str, int]:
    """KEEPALIVES, less what the URL sets itself."""
    given = conninfo_to_dict(url)
    return {name: value for name, value in KEEPALIVES.items() if name not in given}


class PostgresDatabase:
    """Owns the connection pool. The constructor connects nothing; `start()` does."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10) -> None:
        self._pool: Pool = AsyncConnectionPool(
            url,
            # Autocommit: a lone statement is its own transaction, with no BEGIN/COMMIT
            # round trips; multi-statement work opens `conn.transaction()` explicitly.
            # psycopg's default prepare_threshold (prepare a statement on its 6th run on a
            # connection) suits our small, fixed set of statements. Behind a PgBouncer
            # older than 1.21 in transaction mode it would have to be None.
            kwargs={
                "autocommit": True,
                "connect_timeout": CONNECT_TIMEOUT,
                "options": session_options(url),
                **keepalives(url),
            },
            connection_class=BoundedConnection,
            min_size=min_size,
            max_size=max_size,
            open=False,
            timeout=ACQUIRE_TIMEOUT,
            reconnect_timeout=RECONNECT_TIMEOUT,
            name="workflows-postgres",
        )

    @property
    def pool(self) -> Pool:
        return self._pool

    async def start(self, *, wait: bool = True) -> None:
        """Open the pool and, with `wait`, raise DependencyUnavailable unless the database
        answers within ACQUIRE_TIMEOUT. Either way the pool stays open and keeps trying
        in the background, so the service can run while the database is down and recover
        when it returns; call `stop()` in any case."""
        # Not `open(wait=True)`: on timeout it closes the pool for good.
        await self._pool.open(wait=False)
        if wait:
            await ping_database(self._pool)

    async def stop(self) -> None:
        await self._pool.close()


@asynccontextmanager
async def connection(pool: Pool, *, wait: float | None = None) -> AsyncIterator[Connection]:
    """A pooled connection (waited for up to `wait` seconds, by default the pool's
    ACQUIRE_TIMEOUT); an unreachable or failing database raises DependencyUnavailable.

    A connection lost mid-use usually means the server restarted, which has broken every
    idle connection too: drain them, so the next requests connect afresh instead of each
    failing on a dead socket. An idle connection that the server has already closed (a
    restart while it sat in the pool) is noticed before it is used, and replaced: nothing
    was sent on it, so nothing can have happened twice.
    """
    try:
        async with AsyncExitStack() as stack:
            conn = await stack.enter_async_context(pool.connection(timeout=wait))
            if closed_by_server(conn):
                await conn.close()  # returned closed: the pool drops it
                await stack.aclose()
                await pool.drain()  # its idle siblings were closed by the same restart
                conn = await stack.enter_async_context(pool.connection(timeout=wait))
            try:
                yield conn
            except psycopg.OperationalError:
                if conn.broken:
                    await pool.drain()
                raise
    except psycopg.OperationalError as error:  # also PoolTimeout, PoolClosed
        raise DependencyUnavailable("database", str(error) or type(error).__name__) from error


def cancelled_by_server(error: DependencyUnavailable) -> bool:
    """Whether the server answered that the statement was cancelled (its lock timeout,
    say): then nothing of it committed, and there is no lost answer to look for."""
    return isinstance(
        error.__cause__, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable
    )


def closed_by_server(conn: Connection) -> bool:
    """Whether an idle connection has something to read: the server's goodbye (a restart
    sends `FATAL: terminating connection` and closes) or the end of the stream. An idle
    pooled connection is otherwise silent (none of them LISTENs); a spurious True only
    costs a reconnect. One `select` with no wait: a system call, no round trip."""
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.OperationalError):
        return True
    return bool(readable)


@asynccontextmanager
async def transaction(pool: Pool) -> AsyncIterator[Connection]:
    """A pooled connection inside a transaction: committed on normal exit, else rolled back."""
    async with connection(pool) as conn, conn.transaction():
        yield conn


async def ask_patiently(
    pool: Pool, query: LiteralString, params: Sequence[object], *, within: float
) -> TupleRow | None:
    """The first row of a read, asked again every ASK_PAUSE seconds while the database is
    unreachable (restarting, say), for up to `within` seconds; then DependencyUnavailable.
    For finding out what became of a statement whose answer was lost."""
    deadline = time.monotonic() + within
    while True:
        try:
            async with connection(pool, wait=max(deadline - time.monotonic(), ASK_PAUSE)) as conn:
                # Its answer too within `within`: a hung server holds it no longer.
                with waiting_up_to(conn, max(deadline - time.monotonic(), ASK_PAUSE)):
                    return await (await conn.execute(query, params)).fetchone()
        except DependencyUnavailable:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(ASK_PAUSE)


async def rows_left_by(
    pool: Pool, query: LiteralString, params: Sequence[object], *, within: float
) -> int | None:
    """What a write whose answer was lost left behind. `query` returns how many of the rows
    it wrote are there, and whether the server process that ran it still runs. Asked again
    every ASK_PAUSE seconds while it finds none and that process runs (it may still
    commit): the rows found; 0 once the process is gone without them; None when the
    database cannot say within `within` seconds (not known)."""
    deadline = time.monotonic() + within
    while True:
        try:
            left = max(deadline - time.monotonic(), 0.0)
            row = await ask_patiently(pool, query, params, within=left)
        except DependencyUnavailable:
            return None
        found, still_running = row if row is not None else (0, False)
        if found or not still_running:
            return int(found)
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(ASK_PAUSE)


async def ping_database(pool: Pool, *, schema: bool = False) -> None:
    """A `SELECT 1`, answered within ACQUIRE_TIMEOUT of the call, connection included:
    a probe (/readyz) gives its verdict within that one timeout, a hung server's too.
    With `schema`, the workflows table must be there too: a database dropped and made
    anew answers, but every request would fail."""
    deadline = time.monotonic() + ACQUIRE_TIMEOUT
    async with connection(pool) as conn:
        with waiting_up_to(conn, max(deadline - time.monotonic(), SOME_TIME)):
            if not schema:
                await conn.execute("SELECT 1")
                return
            try:
                await conn.execute("SELECT FROM workflows LIMIT 0")
            except psycopg.errors.UndefinedTable as error:
                raise DependencyUnavailable(
                    "database", f"its schema is missing (run `workflows migrate`): {error}"
                ) from None


@contextmanager
def waiting_up_to(conn: Connection, seconds: float = math.inf) -> Iterator[Connection]:
    """`conn`'s round trips in the block wait up to `seconds` (by default as long as the
    server takes) instead of QUERY_TIMEOUT: for a probe that must answer sooner, or a scan
    that takes as long as the table is big (the CLI's counts)."""
    conn.query_timeout = seconds
    try:
        yield conn
    finally:
        conn.query_timeout = None

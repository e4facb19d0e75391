"""A TCP relay in front of a real service, which a test takes down and brings back as a
network failure or a server restart would, without touching the service itself."""

from __future__ import annotations

import asyncio
import socket
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import psycopg

Target = tuple[str, int] | str
"""Where the relay forwards to: (host, port), or the path of a unix socket."""
Direction = Literal["to_server", "to_client"]


class TcpProxy:
    """Listens on 127.0.0.1:`port` (the same port for its whole life, up or down) and
    relays every connection to `target`. It starts down; `url` is the service's URL
    through the relay, for the constructors that take one."""

    def __init__(self, target: Target, url: str = "") -> None:
        self.target = target
        self.port = free_port()
        self.url = url
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._traps: list[tuple[Direction, bytes]] = []
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._dead: set[asyncio.Task[None]] = set()  # connections that relay nothing, ever
        self.sprung = 0
        """How many traps have cut a connection."""

    @classmethod
    def to_postgres(cls, database_url: str) -> TcpProxy:
        """A relay to the server of `database_url` (TCP or unix socket); `url` goes through it."""
        params = psycopg.conninfo.conninfo_to_dict(database_url)
        host = str(params.get("host") or "localhost")
        port = int(str(params.get("port") or 5432))
        target: Target = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)
        proxy = cls(target)
        proxy.url = psycopg.conninfo.make_conninfo(database_url, host="127.0.0.1", port=proxy.port)
        return proxy

    @classmethod
    def to_amqp(cls, amqp_url: str) -> TcpProxy:
        """A relay to the broker of `amqp_url`; `url` keeps its credentials, vhost and query."""
        parts = urlsplit(amqp_url)
        proxy = cls((parts.hostname or "localhost", parts.port or 5672))
        credentials, at, _ = parts.netloc.rpartition("@")
        netloc = f"{credentials}{at}127.0.0.1:{proxy.port}"
        proxy.url = urlunsplit(parts._replace(netloc=netloc))
        return proxy

    @property
    def is_up(self) -> bool:
        return self._server is not None

    async def up(self) -> None:
        """Accept connections again (a no-op when already up)."""
        if self._server is None:
            self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def down(self) -> None:
        """Refuse new connections and cut the open ones: the service is gone."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self.cut()

    async def cut(self) -> None:
        """Close every open connection, as a server restart does; new ones are accepted."""
        connections = list(self._connections)
        for connection in connections:
            connection.cancel()
        await asyncio.gather(*connections, return_exceptions=True)

    def stall(self) -> None:
        """Relay nothing more, either way, on any connection, old or new, until `flow()`:
        a network that drops packets, where the service neither answers nor refuses."""
        self._flowing.clear()

    def flow(self) -> None:
        """Relay again, what was held first."""
        self._flowing.set()

    def blackhole(self) -> None:
        """The connections open now relay nothing more, ever, either way, and are not
        closed: each end waits on a connection that died without a word (a NAT or
        firewall that forgot it). New connections are relayed as before."""
        self._dead.update(self._connections)

    def trap(self, direction: Direction, marker: bytes) -> None:
        """The next chunk of bytes going `direction` that contains `marker` is not
        relayed: its connection is cut instead, both ways. Towards the server, the request
        never arrives; towards the client, the server has done the work and its answer is
        lost (PostgreSQL sends a statement's result and `ReadyForQuery` together, after
        the commit of an autocommit statement)."""
        self._traps.append((direction, marker))

    def _springs(self, direction: Direction, data: bytes) -> bool:
        for trap in self._traps:
            if trap[0] == direction and trap[1] in data:
                self._traps.remove(trap)
                self.sprung += 1
                return True
        return False

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:
            # Accepted just before `down()`, its task first ran after the cut, which could
            # not see it: it would relay through a relay that is down. Refused instead.
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            if isinstance(self.target, str):
                up_reader, upstream = await asyncio.open_unix_connection(self.target)
            else:
                up_reader, upstream = await asyncio.open_connection(*self.target)
            await asyncio.gather(
                self._pump(reader, upstream, "to_server", task),
                self._pump(up_reader, writer, "to_client", task),
            )
        except (OSError, asyncio.CancelledError):
            # Cancelled by `cut()`, which awaits us: returning (not re-raising) keeps
            # asyncio's server from reporting the cancellation as an unhandled error.
            pass
        finally:
            for stream in (writer, upstream):
                if stream is not None:
                    stream.close()
            self._connections.discard(task)
            self._dead.discard(task)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: Direction,
        relay: asyncio.Task[None],
    ) -> None:
        """Copy until end of stream, then close the other side, so each sees the other
        go; a sprung trap cancels the whole relay, which closes both sides."""
        try:
            while data := await reader.read(65536):
                if self._springs(direction, data):
                    relay.cancel()
                    return
                if relay in self._dead:
                    continue
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port

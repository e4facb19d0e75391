"""uvicorn's httptools protocol, sending a response's head and body in one system call.

uvicorn writes the status line and headers of a response (`http.response.start`) and then
its body (`http.response.body`) as two `transport.write` calls, and uvloop sends each at
once: two `send`s per response, two TCP segments for the client to read. On loopback a
`send` runs the receiver's side of TCP too, so each costs far more than its bytes: measured
on this project's 2-core machine, a 250-byte head and a 1,400-byte body sent as two sends
cost 31-77 µs of CPU (sender and receiver) against 16 µs as one (bench/notes.md).

`CoalescingTransport` holds a write until the next write or the end of the event loop's
current iteration, whichever comes first. The head waits for the body, which a handler
sends in the same step (neither `send` suspends), and both leave as one write. Bytes are
never reordered and never held past the iteration, so streamed bodies still flow.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport whose writes are joined with the write that follows them in the same
    loop iteration; everything else is the wrapped transport's."""

    __slots__ = ("_flush_handle", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._flush_handle: asyncio.Handle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is None:
            self._held = bytes(data)
            self._flush_handle = self._loop.call_soon(self._flush)
            return
        self._held = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._transport.write(held + data)

    def _flush(self) -> None:
        self._flush_handle = None
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        """Send what is held, then close (the wrapped transport sends its own buffer first)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()
        self._transport.write_eof()

    def abort(self) -> None:
        """Close at once: what is held is dropped, like the wrapped transport's buffer."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._held = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """`uvicorn --http httptools`, each connection's transport wrapped in a
    `CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        coalescing: Any = CoalescingTransport(transport, self.loop)
        super().connection_made(coalescing)

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
import contextlib
import fcntl
import functools
import logging
import random
import re
import sys
import termios
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from workflows.entrypoints.security import with_defaults


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


log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
"""A request's line and headers together: more is a 431 (httptools sets no limit of its
own: a 100 MB header was read whole, the worker's memory growing by its size)."""
HEAD_TIMEOUT = 10.0
"""Seconds from a request's first bytes to the end of its headers: past it, a 408 (a client
that sends a partial request and nothing more held its connection for ever)."""
BODY_GAP_TIMEOUT = 10.0
"""Seconds a request's body may go without a byte once its headers are in: past it, a 408
(a client that sent its headers and then nothing held its connection, and the request
waiting for its body, for ever)."""
BODY_TIMEOUT = 60.0
"""Seconds from the end of a request's headers to the end of its body, unless it keeps
coming at BODY_MIN_RATE: past it, a 408 (a client sending a byte every few seconds is never
BODY_GAP_TIMEOUT late). 1 MiB, the default MAX_BODY_BYTES, comes in time over a link of
140 kbit/s."""
BODY_MIN_RATE = 17_476
"""Bytes a second, 1 MiB a minute (140 kbit/s): a body that has come at this rate or more
on average since its headers is not late, however long it takes. So a larger
MAX_BODY_BYTES gets the time it needs over the same link, where a fixed BODY_TIMEOUT would
refuse every body over 1 MiB from a client on such a link."""


PIPELINE_LIMIT = 32
"""Requests a connection may have waiting, parsed, behind the one being answered (HTTP/1.1
pipelining): past it, what was read waits unparsed and nothing more is read until an
answer makes room."""
FEED_SLICE = 16 * 1024
"""Bytes parsed at a time from one read, so that a read of many small pipelined requests
stops near PIPELINE_LIMIT: at most ~550 requests of 30 bytes past it, not the ~8,000 of a
256 KiB read."""


HELD_READ_MAX = 1024 * 1024
"""Bytes a held connection may have read and not parsed: while fewer, uvicorn may still
resume reading (at an answer's end, at an app's `receive`), one read at a time, so that a
client that leaves is seen leaving (a long-poll consume held behind 40 pipelined requests
took a workflow for a client gone 5 s before); past it, reading waits for answers."""


class HeldFlowControl(FlowControl):
    """uvicorn's flow control, whose `resume_reading` does nothing once the connection is
    `full`: uvicorn resumes reading at each answer's end and at each `receive` of an app,
    whatever waits behind them. While it is `held`, what is read waits unparsed."""

    held = False
    full = False

    def resume_reading(self) -> None:
        if not self.full:
            super().resume_reading()


HOST = re.compile(
    rb"(?:\[[0-9A-Za-z\-._~!$&'()*+,;=:]+\]|[0-9A-Za-z\-._~!$&'()*+,;=%]*)(?::[0-9]*)?"
)
"""A `Host` header's value (RFC 9110 7.2: `uri-host [ ":" port ]`, where `uri-host` is a
bracketed IP literal or a registered name: unreserved characters, sub-delims and
percent-encodings, possibly none)."""
_host_match = HOST.fullmatch


IDLE_TIMEOUT = 5
"""Seconds a connection may wait with no request begun, before its first one or after an
answer: then it is closed. uvicorn's keep-alive timeout (`workflows serve` sets it to this),
which uvicorn arms only after an answer: a connection that never sent a byte was held for
ever, each a file descriptor of the worker's (with a limit of 1,024 descriptors, 1,100 such
connections made the worker reset every new one, for as long as they were held)."""


UNREAD_TIMEOUT = 60.0
"""Seconds an answer may wait in the worker's memory with its client taking none of it: past
it, the connection is closed and what was left of the answer dropped (nginx's `send_timeout`
counts the same, 60 s by default). A client that stopped reading without closing (a process
that hangs: its kernel goes on acknowledging, with a window of zero) held its answer, up to
a CSV of ~10 MB, for as long as it lived."""


ANSWER_MIN_RATE = BODY_MIN_RATE
"""Bytes a second, averaged over each UNREAD_TIMEOUT while part of an answer waits in the
worker's memory: a client that takes less (1 MiB a minute, 140 kbit/s, as bodies must come)
has its connection closed. Taking a byte now and then no longer holds an answer of
megabytes for hours (Kestrel's MinResponseDataRate does the same, at 240 bytes/s)."""


def _framing_problem(codings: bytes, version: str) -> tuple[int, str] | None:
    """Why a request's `Transfer-Encoding` (its values joined by commas) refuses it, if it
    does (RFC 9112 6): only `chunked` is a transfer coding the server decodes."""
    if version == "1.0":  # 6.1: as if its framing were faulty
        return (
            400,
            "an HTTP/1.0 request cannot have a Transfer-Encoding header: send Content-Length",
        )
    names = [part.partition(b";")[0].strip().lower() for part in codings.split(b",")]
    names = [name for name in names if name]
    if not names or names[-1] != b"chunked":  # 6.3: its length cannot be known
        return 400, "the body's length cannot be known: chunked must be its last transfer coding"
    if len(names) > 1:  # 6.1 suggests a 501, but a client's request never gets a 5xx here
        coding = names[0].decode("latin-1")
        return 400, (
            f"the transfer coding {coding!r} is not supported: send the body chunked alone, or "
            "with Content-Length"
        )
    return None


def _host_problem(hosts: int) -> str:
    """Why a request's `Host` headers refuse it (RFC 9112 3.2: an HTTP/1.1 request without
    one, any request with more than one or with an invalid one, is a 400)."""
    if not hosts:
        return "an HTTP/1.1 request must have a Host header"
    if hosts > 1:
        return f"the request has {hosts} Host headers: it must have one"
    return "the Host header is not a host name or address with an optional port"


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """`uvicorn --http httptools`, each connection's transport wrapped in a
    `CoalescingTransport`, a new connection's wait for its first bytes held to the
    keep-alive timeout (`IDLE_TIMEOUT`), a request's head (its line and headers) to
    `MAX_HEAD_BYTES`, `HEAD_TIMEOUT`, one valid `Host` (`HOST`) and a body framed by
    `Content-Length` or `chunked` alone (`_framing_problem`), an `Upgrade` ignored, its body to
    `BODY_GAP_TIMEOUT` and `BODY_TIMEOUT`, and an answer its client does not read to
    `UNREAD_TIMEOUT`.

    A head that comes in one read, as nearly every one does, costs a counter and a flag: the
    timer starts only when a read ends with a head still incomplete. So with a body: its
    timer starts only when a read ends with the body still incomplete."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        coalescing: Any = CoalescingTransport(transport, self.loop)
        self._head_done = False  # the current request's headers are all in
        self._head_bytes = 0  # bytes read since its head began, while it is incomplete
        # The headers of a request that ended in the current read (or None): the bytes of
        # a head after it in the same read are not counted.
        self._ended: list[tuple[bytes, bytes]] | None = None
        self._head_uncounted = False  # the current head began in such a read: measure it
        self._valid_host = b""  # the last Host of the connection that was valid
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._unread_timer: asyncio.TimerHandle | None = None
        self._unsent = 0  # bytes of answers the client had not taken at the last look
        self._unsent_since = 0.0  # when that figure last went down (or the look began)
        self._window_unsent = 0  # bytes not taken when the current window of looks began
        self._window_since = 0.0  # when it began: every UNREAD_TIMEOUT, the rate is judged
        self._body_last = 0.0  # when the current request's body last grew
        self._body_deadline = 0.0  # when all of it must be in, unless it keeps coming
        self._body_received = 0  # bytes of it read so far
        self._refused = False  # reading and dropping: a refusal is answered or waits
        self._refusal_sent = False
        # A head read whole that must be refused (over MAX_HEAD_BYTES, no Host...): status
        # and detail, answered once the parser has handed back the read.
        self._refusal: tuple[int, str] | None = None
        # The head of an `Upgrade` request without its `Upgrade`, to be parsed again.
        self._replay: bytes | None = None
        # Read but not yet parsed, while the connection is held (`_backlogged`), else None.
        self._unparsed: bytearray | None = None
        self._trailer_bytes = 0  # of the current request's chunked body
        self._unbodied = 0  # bytes read since its body last grew: framing, trailers
        self._running: Any = None  # the request whose app was started last
        self._stopping = False  # the server is shutting down (`shutdown`)
        super().connection_made(coalescing)
        self.flow = HeldFlowControl(coalescing)
        # A new connection is idle until its first bytes: closed after the keep-alive
        # timeout (IDLE_TIMEOUT), as one is after an answer; its first bytes cancel the
        # timer, as a next request's do.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def _should_upgrade_to_ws(self) -> bool:
        """No WebSocket (`_feed`): not even for a CONNECT, whose head is not parsed again."""
        return False

    def data_received(self, data: bytes) -> None:
        flow: HeldFlowControl = self.flow  # type: ignore[assignment]
        if flow.held:  # parsed when answers have made room; one read at a time meanwhile
            unparsed = self._unparsed
            if unparsed is None:
                unparsed = self._unparsed = bytearray()
            unparsed += data
            flow.pause_reading()
            flow.full = len(unparsed) >= HELD_READ_MAX
            return
        self._take(data)

    def _take(self, data: bytes) -> None:
        """Parse what was read, FEED_SLICE bytes at a time when there is more: after each,
        when the connection is `_backlogged`, the rest waits unparsed and reading stops
        until an answer makes room (`on_response_complete`). Parsed whole, one read of
        1.5 MB of pipelined requests queued 50,000 of them (80 bytes of memory for each
        byte read), and each answer let another read in: ten such clients took a worker
        from 74 MB to 1.27 GB."""
        if len(data) <= FEED_SLICE:  # nearly every read
            self._received(data)
            if self._backlogged():
                self._hold()
            return
        view = memoryview(data)
        while len(view) > FEED_SLICE:
            self._received(view[:FEED_SLICE])
            view = view[FEED_SLICE:]
            if self._backlogged():
                self._unparsed = bytearray(view)
                self._hold()
                return
        self._received(view)
        if self._backlogged():
            self._hold()

    def _backlogged(self) -> bool:
        """PIPELINE_LIMIT requests wait behind the one being answered, or the body of the
        last of them (not yet read by its app, which has not started) is over uvicorn's
        HIGH_WATER_LIMIT: uvicorn's own pause lasted only until the answer before it."""
        pipeline = self.pipeline
        return bool(pipeline) and (
            len(pipeline) >= PIPELINE_LIMIT or len(self.cycle.body) > HIGH_WATER_LIMIT
        )

    def _hold(self) -> None:
        flow: HeldFlowControl = self.flow  # type: ignore[assignment]
        flow.held = True
        flow.pause_reading()

    def on_response_complete(self) -> None:
        """uvicorn's (start the next queued request, or arm the keep-alive timeout), then,
        when the connection was held, parse what waited, and read again unless it is
        still backlogged."""
        super().on_response_complete()
        flow: HeldFlowControl = self.flow  # type: ignore[assignment]
        if not flow.held or self.transport.is_closing() or self._backlogged():
            return
        flow.held = flow.full = False
        unparsed, self._unparsed = self._unparsed, None
        if unparsed is not None:
            self._take(bytes(unparsed))
        if not flow.held:
            flow.resume_reading()

    def _received(self, data: bytes | memoryview) -> None:
        if self._refused:
            return  # read and dropped until the client has the answer and closes
        in_body, body_before = self._head_done, self._body_received
        if not in_body:
            self._head_bytes += len(data)
        self._ended = None
        self._feed(data)
        if self._refusal is not None:
            self._refuse_head(*self._refusal)
            return
        if self._head_done:  # the headers are in, the body is still coming
            if in_body and self._body_received == body_before:
                # Not a byte of body in this read: chunk framing or trailer fields, which
                # httptools gathers whole (a 40 MB trailer line held the loop 12 s).
                self._unbodied += len(data)
                if self._unbodied > MAX_HEAD_BYTES:
                    self._refuse_body(431, _TRAILERS)
                    return
            else:
                self._unbodied = 0
            self._body_read()
            return
        if self._ended is not None:  # a request ended in this read
            if self.headers is not self._ended:
                # A head began after it (uvicorn gives each its own list): uncounted bytes,
                # and not yet whole. Timed from now: no timer waited for it, and when the
                # earlier answer had gone before this read, neither did the keep-alive
                # timeout (a client that stopped there held the connection for ever).
                self._head_uncounted = True
                if self._head_timer is None and not self.transport.is_closing():
                    self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_timed_out)
            elif self._answered_before_its_end():
                # Nothing after it, and its answer went before its body ended: idle from
                # now, as after an answer. uvicorn armed its keep-alive timeout at that
                # answer and cancelled it at the next bytes, the rest of the body: a
                # client that then sent nothing held the connection for ever.
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )
        if not self._head_bytes or self.transport.is_closing():
            return
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse_head(431, f"the request line and headers exceed {MAX_HEAD_BYTES} bytes")
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_timed_out)

    def _answered_before_its_end(self) -> bool:
        cycle = self.cycle
        return (
            cycle is not None
            and cycle.response_complete
            and not self.pipeline
            and self.timeout_keep_alive_task is None
            and not self.transport.is_closing()
        )

    def _feed(self, data: bytes | memoryview) -> None:
        """uvicorn's `data_received`, without its two WARNINGs, each a line any client could
        have logged for every request: "Invalid HTTP request received." (the `400` is
        counted and logged once per 10 s, as the server's other refusals), and
        "Unsupported upgrade request." (no `Upgrade` is taken: `on_headers_complete`). Nor
        is a WebSocket handshake taken, which uvicorn did on any path, `/healthz` included,
        when a WebSocket library was installed (`websockets` comes with its extras): the
        app's refusal went out as a bare `403` with no problem document."""
        self._unset_keepalive_if_required()
        while True:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.send_400_response("")
            except httptools.HttpParserUpgrade as upgrade:
                # After an `Upgrade` request's head: that head again, without its
                # `Upgrade`, then what followed it. A CONNECT (no `_replay`: the app
                # answers it a 405) had no body: what followed it is the next request.
                replay, self._replay = self._replay or b"", None
                data = replay + data[upgrade.args[0] :]
                if replay:
                    # A parser that took a request that ends its connection (`Connection:
                    # upgrade, close`, HTTP/1.0) drops all that follows it: the head again
                    # went unread (a 408, or a 431 once its body passed 64 KiB). A new one
                    # reads it; nothing of the old one is needed past a head's end.
                    self.parser = httptools.HttpRequestParser(self)
                    self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
                if data and self._refusal is None:
                    continue
            return

    def on_headers_complete(self) -> None:
        if self._refusal is not None:
            return
        # The bytes read since the head began bound its size: only past the limit is it
        # worth measuring, and a head over it never reaches the app. Unless it began in a
        # read that ended an earlier request (pipelined): that read's bytes were not counted.
        if (
            self._head_bytes > MAX_HEAD_BYTES or self._ended is not None or self._head_uncounted
        ) and self._head_size() > MAX_HEAD_BYTES:
            self._refusal = (431, f"the request line and headers exceed {MAX_HEAD_BYTES} bytes")
            return
        self._head_uncounted = False
        # One valid Host (RFC 9112 3.2), none in HTTP/1.0. A loop over the headers, and a
        # match only when the connection's Host is not the last valid one (~1,850
        # instructions a request; the match alone is ~2,000).
        host, hosts, codings = b"", 0, None
        for name, value in self.headers:
            if name == b"host":
                host, hosts = value, hosts + 1
            elif name == b"transfer-encoding":
                codings = value if codings is None else codings + b"," + value
        if hosts == 1:
            # A connection's requests nearly always name the same Host: matched once.
            valid = host == self._valid_host
            if not valid and _host_match(host) is not None:
                valid, self._valid_host = True, host
        else:
            if self.parser.get_http_version() == "0.9":  # a request line and nothing else
                self._refusal = (400, "the server speaks HTTP/1.1 and 1.0, not HTTP/0.9")
                return
            valid = hosts == 0 and self.parser.get_http_version() == "1.0"
        if not valid:
            self._refusal = (400, _host_problem(hosts))
            return
        if codings is not None:
            self._refusal = _framing_problem(codings, self.parser.get_http_version())
            if self._refusal is not None:
                return
        if self.parser.should_upgrade() and self.parser.get_method() != b"CONNECT":
            # `Connection: upgrade` and an `Upgrade`: the parser reads no body and takes
            # what follows the head as the new protocol's. None is taken (RFC 9110 7.8
            # lets a server ignore it), so the head is parsed again without its `Upgrade`
            # (`_feed`), with its body and what comes after: a POST from `curl --http2`
            # reached the app with an empty body, and a request after it in the same read
            # was dropped.
            version = self.parser.get_http_version().encode()
            head = [b"%s %s HTTP/%s\r\n" % (self.parser.get_method(), self.url, version)]
            head += [n + b": " + v + b"\r\n" for n, v in self.headers if n != b"upgrade"]
            self._replay = b"".join(head) + b"\r\n"
            return
        self._head_done, self._head_bytes, self._body_received = True, 0, 0
        self._trailer_bytes = self._unbodied = 0
        try:
            super().on_headers_complete()
        except (httptools.HttpParserInvalidURLError, AttributeError, UnicodeDecodeError) as exc:
            # Its target cannot be read (`httptools.parse_url`: `CONNECT host:port`,
            # `http://a:bad/`, an absolute form with no path): before any cycle is made.
            # Raised out of the parser, it was taken for a body's framing, with no cycle
            # or an earlier request's: no answer, an ERROR logged, the earlier answer lost.
            self._head_done = False
            self._refusal = (400, f"the request target cannot be read: {_target(exc)}")
            return
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_done:
            super().on_header(name, value)
            return
        # A trailer field of a chunked body (RFC 9112 7.1.2): dropped, as RFC 9110 6.5.1
        # lets a recipient (uvicorn added each to the request's headers, which the app had
        # read already), but counted: 21 MB of them took a worker from 70 to 490 MB.
        self._trailer_bytes += len(name) + len(value) + 4
        if self._trailer_bytes > MAX_HEAD_BYTES:
            self._refuse_body(431, _TRAILERS)

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            self._body_received += len(body)
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is not None or self._replay is not None:
            return  # refused, or an `Upgrade` request's end as the parser saw it: replayed
        super().on_message_complete()
        self._head_done = False  # what comes next is the next request's head
        self._ended = self.headers
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def shutdown(self) -> None:
        """uvicorn's (close when idle, else after the answer under way), and the request
        being answered, if the graceful timeout runs out before its answer and uvicorn
        cancels it, answers a 503 problem and logs one INFO line: it answered a bare 500
        `text/plain` and logged an ERROR with a traceback (an audit, at a rolling update)."""
        self._stopping = True
        running = self._running
        if running is not None and not running.response_complete:
            _answer_503_if_cancelled(running)
        super().shutdown()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._running = cycle
        if self._stopping:  # pipelined, started after the shutdown began: likewise
            _answer_503_if_cancelled(cycle)
        super()._start_asgi_task(cycle, app)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        running = self._running
        if running is not None and running is not self.cycle and not running.response_complete:
            # Answering while later requests wait (pipelined): uvicorn tells only the last
            # of them that its client is gone, and this one's answer was written to the
            # closed transport, an ERROR with uvloop's traceback ("the handler is closed").
            running.disconnected = True
            running.message_event.set()
        super().connection_lost(exc)

    def _stop_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer, self._unread_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._unread_timer = None

    def pause_writing(self) -> None:
        """The transport holds more than its high-water mark: the client reads slower than
        the answer is written, or not at all. The timer starts; it is only armed here, so an
        answer that leaves at once costs nothing."""
        super().pause_writing()
        if self._unread_timer is None:
            self._unsent, self._unsent_since = self._unsent_bytes(), self.loop.time()
            self._window_unsent, self._window_since = self._unsent, self._unsent_since
            self._unread_timer = self.loop.call_later(UNREAD_TIMEOUT / 4, self._unread_late)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._unread_timer is not None:
            self._unread_timer.cancel()
            self._unread_timer = None

    def _unsent_bytes(self) -> int:
        """What the client has not yet taken: the transport's buffer and the kernel's send
        queue (TIOCOUTQ: sent but not acknowledged, or not sent). The buffer alone moves in
        steps of megabytes: the kernel asks for more only once half its queue is free, which
        a client reading 20 KB/s takes over a minute to free."""
        unsent = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4))
                unsent += int.from_bytes(queued, sys.byteorder, signed=True)
        return unsent

    def _unread_late(self) -> None:
        """A look, every quarter of UNREAD_TIMEOUT while writing is paused, at whether the
        client took anything since the last; once it has taken nothing for UNREAD_TIMEOUT,
        the connection is closed at once. (The first look often sees what the client's own
        socket took after the pause: looking only once, at the timeout, would let that pass
        for reading.) Also when the connection is already closing: a close waits for the
        buffer to be sent, which such a client never lets happen. And once every
        UNREAD_TIMEOUT, whether the client took ANSWER_MIN_RATE in that time: else too."""
        # Imported here, as in `_refuse`.
        from workflows.entrypoints import observability

        self._unread_timer = None
        unsent, now = self._unsent_bytes(), self.loop.time()
        if unsent == 0:
            return
        if unsent < self._unsent:
            self._unsent, self._unsent_since = unsent, now
        elif now - self._unsent_since >= UNREAD_TIMEOUT:
            self.transport.abort()  # connection_lost follows: the app sees its client gone
            observability.unread(UNREAD_TIMEOUT, unsent)
            return
        if (window := now - self._window_since) >= UNREAD_TIMEOUT:
            taken = self._window_unsent - unsent
            if taken < ANSWER_MIN_RATE * window:
                self.transport.abort()
                observability.slow_answer(taken / window, unsent)
                return
            self._window_unsent, self._window_since = unsent, now
        self._unread_timer = self.loop.call_later(UNREAD_TIMEOUT / 4, self._unread_late)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._unparsed is not None or self.flow.read_paused:
            # The rest of it was read and waits to be parsed, or is not read: earlier
            # requests wait for their answers (pipelined). That time is the server's.
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_timed_out)
            return
        if not self._head_done and not self.transport.is_closing():
            self._refuse_head(
                408, f"the request's headers did not arrive within {HEAD_TIMEOUT:g} s"
            )

    def _body_read(self) -> None:
        """A read ended with the current request's body incomplete: its clock starts with
        the first such read (the one that brought the headers), and the timer with it."""
        now = self.loop.time()
        self._body_last = now
        if self._body_timer is None:
            self._body_deadline = now + BODY_TIMEOUT
            self._body_timer = self.loop.call_at(self._body_due(), self._body_late)

    def _body_due(self) -> float:
        return min(self._body_last + BODY_GAP_TIMEOUT, self._body_allowed_until())

    def _body_allowed_until(self) -> float:
        """The deadline, later by what the bytes read so far earn at BODY_MIN_RATE beyond
        BODY_TIMEOUT: the body must have averaged that rate since its headers."""
        return self._body_deadline + max(0.0, self._body_received / BODY_MIN_RATE - BODY_TIMEOUT)

    def _body_late(self) -> None:
        """The body's timer: re-armed while the body keeps coming in time, else a 408."""
        self._body_timer = None
        if not self._head_done or self._refused or self.transport.is_closing():
            return
        now = self.loop.time()
        late = None
        if self.pipeline or self.flow.read_paused:
            # Not reading it: the request waits behind an earlier one on its connection, or
            # the app has not taken what was read. That time is the server's, not the
            # client's (counted generously: all of it since the body last grew).
            self._body_deadline += now - self._body_last
            self._body_last = now
        elif now >= self._body_allowed_until():
            late = (
                f"the request's body did not all arrive within {BODY_TIMEOUT:g} s of its headers,"
                f" nor keep coming at {BODY_MIN_RATE} bytes/s on average"
            )
        elif now - self._body_last >= BODY_GAP_TIMEOUT:
            late = f"no byte of the request's body arrived for {BODY_GAP_TIMEOUT:g} s"
        if late is None:
            self._body_timer = self.loop.call_at(self._body_due(), self._body_late)
        else:
            self._body_timed_out(late)

    def _body_timed_out(self, detail: str) -> None:
        cycle = self.cycle
        if not cycle.response_started:
            # The app is waiting for the body: to it the client is gone (its receive says
            # http.disconnect, its answer goes nowhere), and the 408 is ours.
            cycle.disconnected = True
            cycle.message_event.set()
            self._refuse(408, detail)
        elif cycle.response_complete:
            self._end()  # answered without reading it all (a 401, a 413...): only close
        else:  # still answering: look again later
            self._body_timer = self.loop.call_later(BODY_GAP_TIMEOUT, self._body_late)

    def send_400_response(self, msg: str) -> None:
        """httptools could not parse the request (a method it does not know, a control
        character in a header, both Content-Length and Transfer-Encoding...): a problem
        document with the headers of every answer, where uvicorn's is a bare text/plain.
        Unless a head earlier in the same read was to be refused: that is the answer."""
        if self._head_done:  # in the body of a request whose head was read
            self._refuse_body(
                400, "the request's chunked body cannot be read: its framing is invalid"
            )
            return
        unreadable = (400, "the request is not valid HTTP/1.1: its line or headers cannot be read")
        self._refuse_head(*(self._refusal or unreadable))

    def _refuse_body(self, status: int, detail: str) -> None:
        """Refuse the request whose body cannot be read (a chunk size that is not hex...):
        its app, which may be waiting for the rest, sees its client gone (its receive says
        http.disconnect, its answer goes nowhere), and the 400 is ours: at once, or in its
        turn when it waits behind an earlier request (pipelined). Deferred like a refused
        head, it waited for its own app, which waited for the body: the connection and the
        request's task were held for ever, with no answer and no timeout."""
        if self._refused:
            return  # refused already, or its refusal waits: one answer
        cycle = self.cycle
        if self.pipeline and self.pipeline[0][0] is cycle:  # queued: not started yet

            async def refuse(scope: Any, receive: Any, send: Any) -> None:
                cycle.disconnected = True  # uvicorn then sends no 500 for it
                self._refuse(status, detail)

            self.pipeline[0] = (cycle, refuse)
            self._refused = True  # read and dropped meanwhile
            self._stop_timers()
            return
        cycle.disconnected = True
        cycle.message_event.set()
        if cycle.response_started:  # answered, or answering, without its body: only close
            self._end()
        else:
            self._refuse(status, detail)

    def _refuse_head(self, status: int, detail: str) -> None:
        """Refuse a request whose head is refused: at once, or, when requests before it on
        the connection (pipelined) still wait for their answers, after the last of them.
        Written at once, the refusal came before those answers and ended the connection's
        writing, so that each of them failed in the app ('Cannot call write() after
        write_eof()') and never reached the client. Meanwhile what comes is dropped."""
        if self._refused:
            return  # refused already, or its refusal waits: one answer
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self._refuse(status, detail)
            return
        self._refused = True
        self._stop_timers()
        # The last request before it is `self.cycle` (uvicorn queues the ones that wait):
        # its answer's end is told by its `on_response` (uvicorn's `on_response_complete`,
        # which starts the next queued request). Only this cycle's is wrapped, so that
        # answers that end with nothing waiting pay nothing.
        answered = cycle.on_response

        def then_refuse() -> None:
            answered()
            if not self.transport.is_closing():  # not after a `Connection: close` answer
                self._refuse(status, detail)

        cycle.on_response = then_refuse

    def _refuse(self, status: int, detail: str) -> None:
        """Answer a problem document and close: the request never reached the app, or the
        app has not answered and never will."""
        if self._refusal_sent:
            return  # refused already (a head refused whole, then bytes the parser cannot read)
        self._refusal_sent = True
        slug, title = REFUSALS[status]
        body = orjson.dumps(
            {"type": f"/problems/{slug}", "title": title, "status": status, "detail": detail}
        )
        rid = f"{random.getrandbits(128):032x}"
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"x-request-id", rid.encode()),
        ]
        head = [b"HTTP/1.1 %d %s\r\n" % (status, title.encode())]
        head += [name + b": " + value + b"\r\n" for name, value in with_defaults("/", headers)]
        self.transport.write(b"".join(head) + b"\r\n" + body)
        self._end()
        # Imported here: this module loads in `workflows serve`'s parent process too, which
        # must not import prometheus_client (observability.py); a worker has it already.
        from workflows.entrypoints import observability

        scope: Any = self.scope if self._head_done else None  # uvicorn's HTTPScope: a dict
        if scope is not None and "app" not in scope:  # refused before its app ran: routed
            scope["app"] = _routing_app(self.app)  # by the app's routes all the same
        observability.refused(scope, status, detail, rid)

    def _end(self) -> None:
        """Close after what has been written, reading and dropping meanwhile."""
        self._stop_timers()
        # Closed at once with the rest of the request unread, the socket would answer the
        # client's next bytes with a reset, which can destroy the answer before it is read:
        # end the writing side, drop what still comes, close a second later.
        self._refused = True
        self.transport.write_eof()
        self.loop.call_later(REFUSED_LINGER, self.transport.close)


_TRAILERS = f"the request's trailer fields (or chunk extensions) exceed {MAX_HEAD_BYTES} bytes"


def _target(exc: Exception) -> str:
    """What is wrong with a request target that uvicorn could not take apart."""
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return "it is not in origin, absolute or asterisk form with a valid host and port"
    if isinstance(exc, UnicodeDecodeError):
        return "its path is not ASCII"
    return "its absolute form has no path"  # uvicorn: `None.decode`


def _routing_app(app: Any) -> Any:
    """The app with `routes` inside uvicorn's wrappers (ProxyHeadersMiddleware...), or None."""
    for _ in range(8):
        if app is None or hasattr(app, "routes"):
            return app
        app = getattr(app, "app", None)
    return None


def _answer_503_if_cancelled(cycle: Any) -> None:
    cycle.send_500_response = functools.partial(_answer_cancelled, cycle)
    cycle.logger = _CancelledAtShutdown(cycle.logger)


async def _answer_cancelled(cycle: Any) -> None:
    body = orjson.dumps(
        {
            "type": "/problems/service-unavailable",
            "title": "Service Unavailable",
            "status": 503,
            "detail": "the server stopped before this request was answered: it may or may"
            " not have taken effect; retry it (a POST with its Idempotency-Key)",
        }
    )
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await cycle.send(
        {"type": "http.response.start", "status": 503, "headers": with_defaults("/", headers)}
    )
    await cycle.send({"type": "http.response.body", "body": body})


class _CancelledAtShutdown:
    """A request's logger once its server shuts down: uvicorn's cancellation of it at the
    graceful timeout is one INFO line, not an ERROR with its traceback."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def error(self, msg: str, *args: object, exc_info: object = None, **kwargs: Any) -> None:
        if isinstance(exc_info, asyncio.CancelledError):
            log.info("cancelled a request at the graceful shutdown timeout: answered 503")
        else:
            self._logger.error(msg, *args, exc_info=exc_info, **kwargs)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


REFUSED_LINGER = 1.0
"""Seconds a refused connection stays open, reading and dropping, after its answer."""
REFUSALS = {
    400: ("invalid-request", "Bad Request"),
    408: ("request-timeout", "Request Timeout"),
    431: ("request-header-fields-too-large", "Request Header Fields Too Large"),
}

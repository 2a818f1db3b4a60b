"""uvicorn's HTTP protocols with a time and a size limit on the request head.

The ASGI app sees a request only once its head (request line and headers) is complete, so neither
BodyLimit's read timeout nor anything else in the app can stop a client that sends a header byte
every few seconds and never the blank line that ends them; uvicorn times idle keep-alive
connections but not heads. Such a client held its connection, one of CAPAS_MAX_CONNECTIONS, forever.

When the clock runs:
- on a new connection, from the moment it opens until its first request head is complete (uvicorn's
  keep-alive timer starts only after a response, so a connection that never sends a byte was
  held forever too);
- on a kept-alive connection, from the first byte of the next request: the idle wait before it is
  CAPAS_KEEP_ALIVE_S's, so neither timeout shortens the other.
On expiry: 408 with `Connection: close` if part of a request has arrived, else the connection just
closes. The answer is written straight to the socket: the parser has no request to answer.

Size: uvicorn's httptools protocol takes request heads of any size, and httptools' cost grows faster
than linearly with a header's length: one client streaming a 90 MB header kept the event loop, and
every other client, waiting for about 11 s. Past CAPAS_MAX_HEADER_KB the answer is 431 and the
connection closes, the rest unread. h11 has a limit of its own, given the same value (uvicorn
answers 400 past it).

Answers: a client that takes none of an answer's bytes for CAPAS_SEND_TIMEOUT_S is cut off (the
connection aborted). uvicorn times no write: a client that pipelined large GETs and read nothing held
its connection forever, and a connection closed with bytes unsent stays open until they go.

Bytes the parser cannot read (a Content-Length of 'abc', a broken chunk size) get a JSON 400 naming the
parser's reason instead of uvicorn's text 'Invalid HTTP request received.', and the connection closes.
An answer that ends a connection waits for the answer of a pipelined request before it: httptools
parses ahead, and uvicorn wrote its 400 at once, which the client read as the answer to its earlier,
valid request, whose own answer was lost.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeadLimits:
    """The timer and what its expiry does, over a uvicorn HTTP protocol (a mixin: the subclasses
    below say when a head begins and ends, in their parser's terms)."""

    # http_protocol() makes a subclass with the settings' values
    header_timeout: float = 10.0  # seconds
    max_header_bytes: int = 65_536
    send_timeout: float = 30.0  # seconds

    # from the uvicorn protocol this is mixed into
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    server_state: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_begun = False  # bytes of a request head have arrived, its end has not
        self._head_bytes = 0  # bytes received since then (httptools), the first read's excepted
        self._send_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        # Writing pauses as soon as a write leaves bytes the kernel did not take (not past 64 KiB), and
        # resumes once all have gone: a stalled answer is timed from the moment it stalls.
        transport.set_write_buffer_limits(high=0)
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_complete()
        self._send_complete()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout, self.transport.abort)

    def resume_writing(self) -> None:
        self._send_complete()
        super().resume_writing()

    def _send_complete(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _head_begins(self, responding: bool = False) -> None:
        """Bytes of a request head arrived. While a response is in progress (a pipelined request) the
        clock starts only when it ends: a 408 must not be written into another answer."""
        self._head_begun = True
        if not responding:
            self._start_head_timer()

    def _head_complete(self) -> None:
        self._head_begun = False
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_begun:
            detail = (
                f"request headers: not received within {self.header_timeout:g} s (CAPAS_HEADER_TIMEOUT_S)"
            )
            self.transport.write(self._answer(b"408 Request Timeout", detail))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its parser refused; it calls this while handling the parser's error."""
        reason = sys.exc_info()[1] or msg  # httptools' and h11's errors say what was wrong
        self._head_complete()
        self._close_with(self._answer(b"400 Bad Request", f"request: not valid HTTP/1.1 ({reason})"))

    def _close_with(self, answer: bytes) -> None:
        """Write a last answer and close the connection."""
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()

    def _answer(self, status: bytes, detail: str) -> bytes:
        body = json.dumps({"detail": detail}).encode()
        headers = [
            *self.server_state.default_headers,  # date, server
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        return b"HTTP/1.1 " + status + b"\r\n" + lines + b"\r\n" + body


class H11HeadLimits(HeadLimits, H11Protocol):
    """h11 has no parser callbacks: its state says whether a head is pending. The client's state is
    IDLE exactly while the server waits for a request head (h11 starts the next cycle only once the
    response is complete), and bytes h11 holds unparsed then are the start of that head."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._check_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may parse a pipelined request h11 held back
        self._check_head()

    def _check_head(self) -> None:
        if self.conn.their_state is not h11.IDLE:
            self._head_complete()  # parsed (or refused with 400, or upgraded)
        elif self.conn.trailing_data[0]:
            self._head_begins()


class HttpToolsHeadLimits(HeadLimits, HttpToolsProtocol):
    """httptools parses as bytes arrive, pipelined requests included, and says when a request's
    first byte (not counting blank lines) and its last header arrive."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_answer: bytes | None = None  # waiting for the answers of the requests before it
        self._unanswered: list[Any] = []  # the cycles (requests) whose answers are not complete, oldest first

    def connection_lost(self, exc: Exception | None) -> None:
        # uvicorn marks only the latest request disconnected; with pipelined requests the one being
        # answered is an earlier one, whose next write then raised on the closed transport (a 500 and
        # a traceback in the log for a client that left)
        for cycle in self._unanswered:
            if not cycle.response_complete:
                cycle.disconnected = True
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._last_answer is not None:  # the connection ends after it: nothing more is read
            return
        # Counted before httptools sees them: the read that begins a head (at most the event loop's
        # read size, 256 KiB) is parsed whole, every later one only while the head stays in bounds.
        if self._head_begun:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._head_too_large()
                return
        super().data_received(data)

    def _head_too_large(self) -> None:
        self._head_complete()
        detail = f"request headers: more than {self.max_header_bytes // 1024} KiB (CAPAS_MAX_HEADER_KB)"
        self._close_with(self._answer(b"431 Request Header Fields Too Large", detail))

    def _close_with(self, answer: bytes) -> None:
        # httptools parses pipelined requests ahead: while an earlier one is answered, written now, this
        # answer would be read as that one's (the latest request's body is all in: the fault is after it)
        if self._responding() and not self.cycle.more_body:
            self._last_answer = answer
        else:
            super()._close_with(answer)

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete  # the latest request's

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begins(responding=self._responding())

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._head_complete()
        self._unanswered = [cycle for cycle in self._unanswered if not cycle.response_complete] + [self.cycle]

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._last_answer is not None:
            if not self._responding():  # the requests before it are answered
                super()._close_with(self._last_answer)
        elif self._head_begun and not self._responding():  # a pipelined head, still incomplete
            self._start_head_timer()


def http_protocol(
    header_timeout: float,
    max_header_bytes: int,
    send_timeout: float,
    parser: Literal["httptools", "h11"] = "httptools",
) -> type[asyncio.Protocol]:
    """The class for uvicorn.Config(http=...): `parser`'s protocol, answering 408 to a request head
    not complete within `header_timeout` seconds and (httptools) 431 to one over `max_header_bytes`,
    and aborting a connection whose answer has taken no bytes for `send_timeout` seconds; h11's own
    head limit is uvicorn.Config's h11_max_incomplete_event_size. httptools by default: it is
    what uvicorn's "auto" picks when installed, and uvicorn[standard] (capas' serve extra) always
    installs it."""
    base = {"httptools": HttpToolsHeadLimits, "h11": H11HeadLimits}[parser]
    limits = {
        "header_timeout": header_timeout,
        "max_header_bytes": max_header_bytes,
        "send_timeout": send_timeout,
    }
    return type(base.__name__, (base,), limits)

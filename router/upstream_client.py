"""The HTTP/1.1 client of the router's legs: keep-alive connections per backend, httptools' parser.

Why not aiohttp's client, which the router's server, health checks and /v1/models still use: each routed request
makes two upstream calls, and aiohttp's client spent about 0.1 ms of CPU on each here (bench/router_bench.py:
a relay built on it used 0.35 CPU ms per request, the same relay with this client 0.14). What a leg needs is
small: POST a JSON body, read the answer whole or event by event, then hand the connection back or close it.

A pooled connection idle longer than `keepalive_s`, counted from the end of its last answer (when the backend's
own idle timer starts), is closed instead of reused: a backend closing it at the same moment would fail a healthy
request. A connection that carries anything but the answer asked for is closed. A response's body is buffered up
to `read_bufsize`; beyond that the socket is not read until the caller reads (backpressure from a slow client
reaches the backend), except while a read waits for more, as one SSE event of up to its `max_size` may need.
"""
from __future__ import annotations

import asyncio
import ssl
import time
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

from router.upstream_response import UpstreamError, UpstreamResponse


class _Connection(asyncio.Protocol):
    """One connection to a backend, carrying one request at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int, bool]) -> None:
        self.pool, self.key = pool, key
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.head: asyncio.Future | None = None  # the answer's headers, while awaited
        self.resp: UpstreamResponse | None = None
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.closed = self.paused = self.keep_alive = False
        self.informational = False  # a 1xx answer, which the real one follows
        self.ends_at_close = False  # an answer with neither Content-Length nor chunked encoding
        self.idle_since = 0.0
        self.tail: asyncio.TimerHandle | None = None  # released before its answer ended: closes it unless it ends

    def send(self, request: bytes) -> asyncio.Future:
        self.head, self.resp, self.headers = asyncio.get_running_loop().create_future(), None, CIMultiDict()
        self.keep_alive = False
        self.transport.write(request)
        return self.head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.head is None:  # nothing was asked: a backend talking out of turn is not reused
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the backend switched protocols (an HTTP upgrade nobody asked for)"))
            self.close()
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"the backend's answer is not valid HTTP: {e!r}"))
            self.close()

    def on_message_begin(self) -> None:
        if self.head is None:  # bytes after the answer, in the same read: this connection is out of step. Raising
            raise UpstreamError("an answer nobody asked for")  # stops the parse; data_received closes it

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.resp is None:  # else a chunked body's trailer, not a header of the answer
            self.headers.add(name.decode(errors="surrogateescape"), value.decode(errors="surrogateescape"))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            self.informational, self.headers = True, CIMultiDict()
            return
        self.ends_at_close = ("content-length" not in self.headers
                              and "chunked" not in self.headers.get("transfer-encoding", "").lower())
        self.resp = UpstreamResponse(self, status, self.headers)
        if not self.head.done():  # else the caller stopped waiting: post() closes the connection
            self.head.set_result(self.resp)

    def on_body(self, body: bytes) -> None:
        if self.resp._feed(body) > self.pool.read_bufsize and self.resp._more is None and not self.paused:
            self.transport.pause_reading()
            self.paused = True

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self.keep_alive = self.parser.should_keep_alive()
        self.idle_since = time.monotonic()  # the backend's idle timer starts now, not when the caller releases
        self.head = None
        self.resp._end(None)
        self.wanting()  # nothing more to buffer: a connection paused for its body reads again (its close, its FIN)
        if self.tail is not None:  # released before this end arrived
            self.tail.cancel()
            self.tail = None
            self.release(True, 0.0)

    def wanting(self) -> None:
        """The answer's reader waits for more: read the socket again."""
        if self.paused and not self.closed:
            self.transport.resume_reading()
            self.paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if exc is None and self.resp is not None and self.head is not None and self.ends_at_close:
            self.head = None
            self.resp._end(None)  # such an answer ends where the connection does
            return
        self._fail(UpstreamError("the backend closed the connection before its answer was complete"
                                 + (f" ({exc})" if exc else "")))

    def _fail(self, error: UpstreamError) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        elif self.resp is not None and self.head is not None:
            self.resp._end(error)
        self.head = None

    def release(self, ended: bool, tail_s: float) -> None:
        if ended and self.keep_alive and not self.closed:
            self.pool.put_back(self)
        elif tail_s > 0 and not self.closed and self.head is not None:  # the answer's end may be close behind
            self.wanting()  # a body paused at read_bufsize must be read on to reach that end
            self.tail = asyncio.get_running_loop().call_later(tail_s, self.close)
        else:
            self.close()

    def close(self) -> None:
        """Closed by the router: an answer still arriving on it fails, its message saying the router closed it."""
        if not self.closed:
            self._fail(UpstreamError("the router closed the connection"))
            self.closed = True
            self.transport.close()


class UpstreamPool:
    """Keep-alive connections to backends, by scheme, host and port; one request on a connection at a time."""

    def __init__(self, keepalive_s: float, connect_timeout_s: float, read_bufsize: int) -> None:
        self.keepalive_s, self.connect_timeout_s, self.read_bufsize = keepalive_s, connect_timeout_s, read_bufsize
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._targets: dict[str, tuple[tuple[str, int, bool], bytes]] = {}
        self._tls: ssl.SSLContext | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """POST a JSON `body` to `url`; the answer once its headers arrived. Raises UpstreamError."""
        if self._closed:
            raise UpstreamError("the router is shutting down")
        key, start = self._target(url)
        lines = b"".join(b"%s: %s\r\n" % (_header(k), _header(v)) for k, v in headers.items())
        conn = self._idle_connection(key) or await self._connect(key)
        head = conn.send(start + b"Content-Length: %d\r\n%s\r\n" % (len(body), lines) + body)
        try:
            return await head
        except BaseException:  # failed, timed out or cancelled mid-request: the connection's state is unknown
            conn.close()
            raise

    def _target(self, url: str) -> tuple[tuple[str, int, bool], bytes]:
        """Where `url` is, and its request line and fixed headers (parsed once per URL)."""
        got = self._targets.get(url)
        if got is None:
            parts = urlsplit(url)
            tls = parts.scheme == "https"
            key = (parts.hostname or "", parts.port or (443 if tls else 80), tls)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            # identity: the answer is relayed as it comes, and a backend may compress one not asked to be plain
            start = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                     "Accept-Encoding: identity\r\n").encode()
            got = self._targets[url] = (key, start)
        return got

    def _idle_connection(self, key: tuple[str, int, bool]) -> _Connection | None:
        idle, now = self._idle.get(key), time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing() and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.close()
        return None

    async def _connect(self, key: tuple[str, int, bool]) -> _Connection:
        host, port, tls = key
        if tls and self._tls is None:
            self._tls = ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await asyncio.get_running_loop().create_connection(
                    lambda: _Connection(self, key), host, port, ssl=self._tls if tls else None)
        except TimeoutError:
            raise UpstreamError(f"connecting to {host}:{port} timed out after {self.connect_timeout_s} s") from None
        except OSError as e:
            raise UpstreamError(f"connecting to {host}:{port}: {e}") from None
        if self._closed:  # shut while connecting
            conn.close()
            raise UpstreamError("the router is shutting down")
        self._open.add(conn)
        return conn

    def put_back(self, conn: _Connection) -> None:
        """An answered connection, idle since its answer ended, for the next request to its backend."""
        self._idle.setdefault(conn.key, []).append(conn)
        self._schedule()

    def _schedule(self) -> None:
        """The sweep, due when the longest-idle pooled connection reaches keepalive_s."""
        if self._sweep is None and any(self._idle.values()):
            oldest = min(conn.idle_since for idle in self._idle.values() for conn in idle)
            self._sweep = asyncio.get_running_loop().call_later(
                max(0.0, oldest + self.keepalive_s - time.monotonic()), self._expire)

    def _expire(self) -> None:
        """Close the connections idle past keepalive_s."""
        self._sweep, now = None, time.monotonic()
        for idle in self._idle.values():
            for conn in [conn for conn in idle if now - conn.idle_since >= self.keepalive_s]:
                idle.remove(conn)
                conn.close()
        self._schedule()

    def forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        """Every connection closed (an answer already whole can still be read); a leg asked for later fails."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._open):
            conn.close()
        self._idle.clear()


def _header(text: str) -> bytes:
    """A header name or value, refused if it could end the header early (the router's own parser already refuses
    such client headers: this keeps a leg's request well-formed whatever the caller passes)."""
    if "\r" in text or "\n" in text:
        raise ValueError(f"a line break in header text {text[:40]!r}")
    return text.encode("utf-8", "surrogateescape")  # as aiohttp's server decoded the client's header bytes

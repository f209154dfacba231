"""A backend's answer as the router's leg client (router/upstream_client.py) delivers it: status and headers at once,
the body read whole or up to a separator as it arrives, then the connection released or closed, once."""
from __future__ import annotations

import asyncio
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy


class Carrier(Protocol):
    """The connection an answer arrives on (router/upstream_client.py's _Connection)."""

    def wanting(self) -> None: ...

    def release(self, ended: bool, tail_s: float) -> None: ...

    def close(self) -> None: ...


class UpstreamError(ConnectionError):
    """No whole answer: connecting failed or timed out, the connection closed (by the backend, or by the router, which
    the message says) before the answer was complete, the answer was not HTTP/1.1 as asked, or the pool is shut."""


class EventTooLarge(UpstreamError):
    """No separator within the read's max_size: the backend's event is larger than any it should send."""


class UpstreamResponse:
    """A backend's answer once its headers arrived. Read it with read() or readuntil(); then release() (the
    connection goes back to the pool if the answer was read to its end) or close() (it is closed: a backend
    drops the request behind it)."""

    def __init__(self, conn: Carrier, status: int, headers: CIMultiDict[str]) -> None:
        self._conn, self.status, self.headers = conn, status, CIMultiDictProxy(headers)
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already searched for readuntil's separator
        self._eof = False
        self._error: BaseException | None = None
        self._more: asyncio.Future | None = None
        self._let_go = False  # released or closed: a second call must not hand the connection out twice

    async def read(self) -> bytes:
        """The whole body (raises UpstreamError if it broke off)."""
        while not self._eof:
            await self._wait()
        out, self._buf = bytes(self._buf), bytearray()
        return out

    async def readuntil(self, sep: bytes, max_size: int) -> bytes:
        """The body through the next `sep`, or what is left of it (b"" at its end)."""
        while True:
            at = self._buf.find(sep, max(0, self._scanned - len(sep) + 1))
            if at >= 0:
                end = at + len(sep)
                out, self._scanned = bytes(self._buf[:end]), 0
                del self._buf[:end]
                return out
            self._scanned = len(self._buf)
            if len(self._buf) > max_size:
                raise EventTooLarge(f"no {sep!r} in the first {max_size} bytes of an event")
            if self._eof:
                out, self._buf, self._scanned = bytes(self._buf), bytearray(), 0
                return out
            await self._wait()

    def release(self, tail_s: float = 0.0) -> None:
        """Done with this answer: its connection is reused if the whole answer arrived and the backend keeps it open. An
        answer whose reader stopped before its end is closed, or with `tail_s`, given that long for the rest to
        arrive first (a stream read to its [DONE], its chunked terminator still on the way)."""
        if not self._let_go:
            self._let_go = True
            self._conn.release(self._eof and self._error is None, tail_s)

    def close(self) -> None:
        """Done with this answer, its connection closed (a backend drops the request behind it)."""
        if not self._let_go:
            self._let_go = True
            self._conn.close()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._more = asyncio.get_running_loop().create_future()
        self._conn.wanting()
        try:
            await self._more
        finally:
            self._more = None
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        if self._more is not None and not self._more.done():
            self._more.set_result(None)

    def _feed(self, data: bytes) -> int:
        self._buf += data
        self._wake()
        return len(self._buf)

    def _end(self, error: BaseException | None) -> None:
        """The body ended (error None) or broke off."""
        if error is None:
            self._eof = True
        else:
            self._error = error
        self._wake()

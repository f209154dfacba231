"""Calls to a backend, with every way they can fail turned into an UpstreamFailure that names the backend."""
from __future__ import annotations

import asyncio
import json

from router.backend_wait import BackendWait
from router.failures import UpstreamFailure
from router.registry import Backend
from router.upstream_client import UpstreamPool
from router.upstream_response import UpstreamError, UpstreamResponse

UPSTREAM_ERRORS = (UpstreamError, TimeoutError)
ERROR_TEXT_WAIT_S = 5.0
MAX_EVENT_BYTES = 16 << 20  # one SSE event (a chunk with top-20 logprobs of n sequences is far below)


def describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def post(pool: UpstreamPool, b: Backend, path: str, body: dict, headers: dict[str, str],
               timeout_s: float) -> UpstreamResponse:
    """The backend's response once its headers arrived (the caller releases or closes it). A 5xx is the
    backend's failure; a 4xx is the request's and is returned."""
    try:
        with BackendWait(b, timeout_s):
            up = await pool.post(b.inst.url + path, json.dumps(body).encode(), headers)
    except UPSTREAM_ERRORS as e:
        raise UpstreamFailure(b.name, describe(e)) from None
    if up.status >= 500:
        try:  # the answer is a failure already: its text is worth a short wait, not the leg's whole timeout
            async with asyncio.timeout(min(timeout_s, ERROR_TEXT_WAIT_S)):
                detail = (await up.read())[:300].decode(errors="replace")
        except UPSTREAM_ERRORS:
            detail = ""
        finally:
            up.close()
        raise UpstreamFailure(b.name, f"HTTP {up.status} {detail}".strip())
    return up


async def read_all(up: UpstreamResponse, b: Backend, timeout_s: float) -> bytes:
    try:
        with BackendWait(b, timeout_s):
            return await up.read()
    except UPSTREAM_ERRORS as e:
        raise UpstreamFailure(b.name, describe(e)) from None


async def read_event(up: UpstreamResponse, b: Backend, timeout_s: float) -> bytes:
    """The next SSE event (through its blank line), or b"" at the end of the stream."""
    try:
        with BackendWait(b, timeout_s):
            return await up.readuntil(b"\n\n", max_size=MAX_EVENT_BYTES)
    except UPSTREAM_ERRORS as e:
        raise UpstreamFailure(b.name, describe(e)) from None

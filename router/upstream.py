"""Calls to a backend, with every way they can fail turned into an UpstreamFailure that names the backend."""
from __future__ import annotations

import asyncio

import aiohttp
from aiohttp.http_exceptions import LineTooLong

from router.failures import UpstreamFailure
from router.registry import Backend, DownWatch

UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError, LineTooLong)
MAX_EVENT_BYTES = 16 << 20  # one SSE event (a chunk with top-20 logprobs of n sequences is far below)


def describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def post(session: aiohttp.ClientSession, b: Backend, path: str, body: dict, headers: dict[str, str],
               timeout_s: float) -> aiohttp.ClientResponse:
    """The backend's response once its headers arrived (the caller closes it). A 5xx is the backend's
    failure; a 4xx is the request's and is returned."""
    try:
        with DownWatch(b):
            async with asyncio.timeout(timeout_s):
                up = await session.post(b.inst.url + path, json=body, headers=headers)
    except UPSTREAM_ERRORS as e:
        raise UpstreamFailure(b.name, describe(e)) from None
    if up.status >= 500:
        try:
            async with asyncio.timeout(timeout_s):
                detail = (await up.read())[:300].decode(errors="replace")
        except UPSTREAM_ERRORS:
            detail = ""
        finally:
            up.close()
        raise UpstreamFailure(b.name, f"HTTP {up.status} {detail}".strip())
    return up


async def read_all(up: aiohttp.ClientResponse, b: Backend, timeout_s: float) -> bytes:
    try:
        with DownWatch(b):
            async with asyncio.timeout(timeout_s):
                return await up.read()
    except UPSTREAM_ERRORS as e:
        raise UpstreamFailure(b.name, describe(e)) from None


async def read_event(up: aiohttp.ClientResponse, b: Backend, timeout_s: float) -> bytes:
    """The next SSE event (through its blank line), or b"" at the end of the stream."""
    try:
        with DownWatch(b):
            async with asyncio.timeout(timeout_s):
                return await up.content.readuntil(b"\n\n", max_size=MAX_EVENT_BYTES)
    except UPSTREAM_ERRORS as e:
        raise UpstreamFailure(b.name, describe(e)) from None

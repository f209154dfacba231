"""Relaying the decode leg's answer to the client.

A stream's headers go to the client only once the decode leg's first event arrived, so a decode
node that fails before producing anything can still be replaced (nothing was sent). After that the
router never sends a second response: an upstream failure ends the stream with an OpenAI-shaped
`error` event and `data: [DONE]`. Client writes raise ClientGone, never a connection error that
could be taken for the backend's. `kv_transfer_params` is internal and is removed from every answer, and the
cached tokens the decode node reports are corrected by the prefill node's (router/usage.py).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from aiohttp import web

from router.failures import ClientGone, UpstreamFailure
from router.metrics import ITL, child
from router.registry import Backend
from router.upstream import read_all, read_event
from router.upstream_response import UpstreamResponse
from router.usage import correct_details, prefill_details

HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}
DONE = b"data: [DONE]"


@dataclass
class RelayOutcome:
    response: web.StreamResponse
    failure: UpstreamFailure | None = None  # the decode failed after the stream started
    client_gone: bool = False
    first_byte_at: float | None = None  # when the answer's first event went out (None: it never did)

    @property
    def complete(self) -> bool:
        return self.failure is None and not self.client_gone


def client_headers(up: UpstreamResponse, request_id: str) -> dict[str, str]:
    """The backend's headers for the client, less hop-by-hop ones and any that is not ASCII (HTTP's own rule for new
    fields; a byte that is not UTF-8 could not be written back out)."""
    headers = {k: v for k, v in up.headers.items()
               if k.lower() not in HOP_HEADERS and k.isascii() and v.isascii()}
    headers["x-kvbridge-request-id"] = request_id
    return headers


def fix_answer(data: bytes, prefill: dict | None = None) -> bytes:
    """`data` (a JSON object) without its top-level kv_transfer_params, and its usage's counts corrected by the
    prefill leg's `prefill` details; anything else unchanged (and not parsed unless one of the two is there)."""
    if b'"kv_transfer_params"' not in data and (prefill is None or b'"cached_tokens"' not in data):
        return data
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return data
    if not isinstance(obj, dict):
        return data
    corrected = prefill is not None and correct_details(obj, prefill)
    if "kv_transfer_params" not in obj and not corrected:
        return data
    obj.pop("kv_transfer_params", None)
    return json.dumps(obj).encode()


async def rewrite_event(event: bytes, prefill_leg: asyncio.Task | None) -> bytes:
    """An SSE event with each data line fixed (fix_answer); the prefill leg's details are awaited only for an
    event that carries cached tokens (the usage chunk at a stream's end)."""
    prefill = await prefill_details(prefill_leg) if b'"cached_tokens"' in event else None
    if b'"kv_transfer_params"' not in event and prefill is None:
        return event
    lines = event.split(b"\n")
    return b"\n".join(b"data: " + fix_answer(ln[6:], prefill) if ln.startswith(b"data: ") else ln for ln in lines)


def error_event(message: str) -> bytes:
    """OpenAI's shape for an error inside a stream (the openai client raises APIError on it), then [DONE]."""
    err = {"error": {"message": message, "type": "upstream_error", "param": None, "code": "upstream_failed"}}
    return b"data: " + json.dumps(err).encode() + b"\n\n" + DONE + b"\n\n"


async def write(resp: web.StreamResponse, data: bytes, timeout_s: float) -> None:
    """A client that stops reading but keeps its connection open blocks the write once the buffers fill; after
    `timeout_s` it is treated as gone, so it cannot hold its decode request (and its slot of the router) for ever."""
    try:
        async with asyncio.timeout(timeout_s):
            await resp.write(data)
    except ConnectionError as e:
        raise ClientGone(f"client went away: {e}") from None
    except TimeoutError:
        raise ClientGone(f"client read nothing for {timeout_s:g} s") from None


async def relay_whole(up: UpstreamResponse, b: Backend, request_id: str, timeout_s: float,
                      prefill_leg: asyncio.Task | None) -> RelayOutcome:
    """A non-streamed answer (or a stream's 4xx), read in full before anything is sent: an
    UpstreamFailure here leaves the request free to be retried. `prefill_leg`: router/usage.py."""
    data = await read_all(up, b, timeout_s)
    prefill = await prefill_details(prefill_leg) if b'"cached_tokens"' in data else None
    response = web.Response(body=fix_answer(data, prefill), status=up.status,
                            headers=client_headers(up, request_id))
    return RelayOutcome(response, first_byte_at=time.monotonic())


async def relay_stream(request: web.Request, up: UpstreamResponse, b: Backend, request_id: str,
                       first_byte_timeout_s: float, read_timeout_s: float, write_timeout_s: float,
                       prefill_leg: asyncio.Task | None, kv_wait_over: asyncio.Event) -> RelayOutcome:
    """A stream, relayed event by event once its first event arrived. `kv_wait_over` is set then: a decode node
    that streams a token has its KV or computed the prompt itself (router/prefill_leg.py's notice is moot)."""
    first = await read_event(up, b, first_byte_timeout_s)  # a failure here: nothing sent, retryable
    if not first.strip():
        raise UpstreamFailure(b.name, "stream ended before its first event")
    kv_wait_over.set()
    resp = web.StreamResponse(status=up.status, headers=client_headers(up, request_id))
    out = RelayOutcome(resp)
    try:
        try:
            await resp.prepare(request)
        except ConnectionError as e:
            raise ClientGone(str(e)) from None
        await write(resp, await rewrite_event(first, prefill_leg), write_timeout_s)
        out.first_byte_at = time.monotonic()
        done = first.startswith(DONE)
        last, itl = time.monotonic(), child(ITL, request.path)
        while not done:
            try:
                event = await read_event(up, b, read_timeout_s)
            except UpstreamFailure as e:
                out.failure = e
                break
            if not event:
                out.failure = UpstreamFailure(b.name, "stream ended without [DONE]")
                break
            done = event.startswith(DONE)
            if not done:
                now = time.monotonic()
                itl.observe(now - last)
                last = now
            await write(resp, await rewrite_event(event, prefill_leg), write_timeout_s)
        if out.failure:
            await write(resp, error_event(f"the decode instance failed mid-stream: {out.failure}"), write_timeout_s)
        try:
            async with asyncio.timeout(write_timeout_s):
                await resp.write_eof()
        except (ConnectionError, TimeoutError):
            raise ClientGone("client went away before the end of the stream") from None
    except ClientGone:
        out.client_gone = True
        if request.transport is not None:  # else aiohttp's own end of the response would wait on a full socket
            request.transport.abort()
    return out

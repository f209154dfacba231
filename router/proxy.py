"""One PD request: pick instances, mint a transfer id, send both legs at once, stream the decode leg.

The prefill leg carries `max_tokens=1` and names the decode instance's kv address; the
decode leg says KV is coming. Both go out concurrently: the connector does not care
which arrives first. If the prefill leg fails, the decode instance recomputes
(`decode_prefills`) or the client gets a clean 502 (`error`). A client that goes away
cancels both legs (aiohttp cancels the handler; closing the upstream connections makes
vLLM abort them, and the connector releases what they held).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict

import aiohttp
from aiohttp import web

from router.config import RouterConfig
from router.metrics import CANCELLED, PREFILL_FAILURES, TTFT
from router.openai_errors import APIError
from router.pool_probe import cancel_transfer
from router.registry import Backend, Registry

log = logging.getLogger("kvbridge.router")
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}


class Proxy:
    def __init__(self, cfg: RouterConfig, registry: Registry, session: aiohttp.ClientSession) -> None:
        self.cfg, self.registry, self.session = cfg, registry, session
        self.traces: OrderedDict[str, dict] = OrderedDict()

    async def handle(self, request: web.Request, path: str, body: dict) -> web.StreamResponse:
        rid = f"kvb-{uuid.uuid4().hex}"
        trace = self._trace(rid, path)
        tried: set[str] = set()
        try:
            while True:
                decode = self.registry.pick("decode", exclude=tried)
                if decode is None:
                    raise APIError(503, "no healthy decode instance", "service_unavailable", code="no_decode")
                tried.add(decode.name)
                try:
                    return await self._one_attempt(request, path, body, decode, trace)
                except aiohttp.ClientConnectionError as e:
                    # Nothing was sent to the client yet: another decode instance may serve it.
                    self.registry.report_failure(decode, f"{type(e).__name__}: {e}")
                    trace["events"].append(("decode_failed", decode.name, self._ms(trace)))
        except asyncio.CancelledError:
            CANCELLED.inc()
            trace["events"].append(("cancelled", "", self._ms(trace)))
            raise
        finally:
            trace["events"].append(("done", "", self._ms(trace)))

    async def _one_attempt(self, request: web.Request, path: str, body: dict, decode: Backend,
                           trace: dict) -> web.StreamResponse:
        tid = uuid.uuid4().hex
        prefill = self.registry.pick("prefill")
        decode_body = dict(body)
        prefill_task = None
        if prefill is not None and decode.kv_address:
            decode_body["kv_transfer_params"] = {"kvbridge": {"transfer_id": tid, "receive": True}}
            prefill_body = dict(body, max_tokens=1, stream=False,
                                kv_transfer_params={"kvbridge": {"transfer_id": tid, "push_to": decode.kv_address}})
            prefill_body.pop("max_completion_tokens", None)
            prefill_body.pop("stream_options", None)
            prefill_task = asyncio.create_task(self._prefill(prefill, path, prefill_body, trace, decode, tid))
        elif self.cfg.on_prefill_failure == "error":
            raise APIError(503, "no healthy prefill instance", "service_unavailable", code="no_prefill")
        trace["events"].append(("dispatched", f"prefill={prefill.name if prefill else None} decode={decode.name}",
                                self._ms(trace)))
        if prefill_task is not None:
            trace["transfer"] = (decode.kv_address, tid)
        finished = False
        try:
            resp = await self._decode(request, path, decode_body, decode, trace, prefill_task)
            finished = resp.status == 200
            return resp
        finally:
            if prefill_task is not None:
                if not prefill_task.done():
                    prefill_task.cancel()
                if not finished:
                    # The client left or the decode leg failed: whatever the prefill pushed must not wait
                    # for a decode request that will never claim it.
                    asyncio.ensure_future(cancel_transfer(decode.kv_address, tid, self.cfg.health_timeout_s,
                                                          self.cfg.kv_secret))

    async def _prefill(self, b: Backend, path: str, body: dict, trace: dict, decode: Backend, tid: str) -> bool:
        self.registry.acquire(b)
        try:
            async with self.session.post(b.inst.url + path, json=body) as r:
                await r.read()
                ok = r.status == 200
                why = f"HTTP {r.status}"
        except aiohttp.ClientConnectionError as e:
            self.registry.report_failure(b, f"{type(e).__name__}: {e}")
            ok, why = False, type(e).__name__
        finally:
            self.registry.release(b)
        trace["events"].append(("prefill_done" if ok else "prefill_failed", f"{b.name} {why}", self._ms(trace)))
        if not ok:
            PREFILL_FAILURES.labels(self.cfg.on_prefill_failure).inc()
            log.warning("prefill leg on %s failed (%s); decode instance falls back by its load policy", b.name, why)
            await cancel_transfer(decode.kv_address, tid, self.cfg.health_timeout_s, self.cfg.kv_secret)
        return ok

    async def _decode(self, request: web.Request, path: str, body: dict, b: Backend, trace: dict,
                      prefill_task: asyncio.Task | None) -> web.StreamResponse:
        self.registry.acquire(b)
        try:
            async with self.session.post(b.inst.url + path, json=body) as up:
                if prefill_task is not None and self.cfg.on_prefill_failure == "error":
                    if not await prefill_task:
                        raise APIError(502, "the prefill instance failed", "upstream_error", code="prefill_failed")
                headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP_HEADERS}
                headers["x-kvbridge-request-id"] = trace["id"]
                if not body.get("stream"):
                    data = await up.read()
                    TTFT.labels(path).observe(self._ms(trace) / 1000)
                    trace["events"].append(("decode_done", f"{b.name} HTTP {up.status}", self._ms(trace)))
                    return web.Response(body=data, status=up.status, headers=headers)
                resp = web.StreamResponse(status=up.status, headers=headers)
                await resp.prepare(request)
                first = True
                async for piece in up.content.iter_any():
                    if first:
                        TTFT.labels(path).observe(self._ms(trace) / 1000)
                        trace["events"].append(("first_token", b.name, self._ms(trace)))
                        first = False
                    await resp.write(piece)
                await resp.write_eof()
                trace["events"].append(("decode_done", b.name, self._ms(trace)))
                return resp
        finally:
            self.registry.release(b)

    def _trace(self, rid: str, path: str) -> dict:
        trace = {"id": rid, "path": path, "t0": time.monotonic(), "events": []}
        if self.cfg.trace_history:
            self.traces[rid] = trace
            while len(self.traces) > self.cfg.trace_history:
                self.traces.popitem(last=False)
        return trace

    @staticmethod
    def _ms(trace: dict) -> float:
        return round((time.monotonic() - trace["t0"]) * 1000, 3)

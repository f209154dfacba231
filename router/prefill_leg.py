"""The prefill leg: a 1-token request that makes the prefill node compute the prompt and push its KV.

Its failure is the prefill node's (counted) unless it was cancelled because the client left or the
decode leg ended first (not counted). A 400, 413 or 422 is neither: the node refused the request's content (a
prompt over its context length, a parameter out of range), which the decode node would refuse too, so it is kept
for the client (`refusal`) and counted as no failure. A failed leg cancels the transfer at the decode connector, which
then recomputes the prompt itself instead of waiting for KV that will not come; a leg that answered tells
the connector so, which then gives up on a producer it has not heard from within its `no_show_s`, unless the decode
leg stopped waiting for KV within `ANSWERED_NOTICE_AFTER_S`: a streamed answer's first token came, or the decode
leg is over (answered in full, or ended and its transfer cancelled). Nothing is then left to give up on.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from router.config import RouterConfig
from router.failures import UpstreamFailure
from router.metrics import PREFILL_FAILURES
from router.pool_probe import cancel_transfer, prefill_answered
from router.registry import Backend, Registry
from router.request_trace import Trace
from router.upstream import post, read_all
from router.upstream_client import UpstreamPool

log = logging.getLogger("kvbridge.router")
# The request's own content refused (a prompt over the context length, a bad parameter, a body too large); other
# 4xx (401, 403, 404, 405, 408, 429...) say the router or node is misconfigured or busy: a prefill failure
REQUEST_REFUSED = frozenset({400, 413, 422})
ANSWERED_SEND_S = 0.25  # a decode connector that cannot take the notice this soon is down or unreachable
# The notice waits this long for the decode leg to stop waiting for KV: a transfer that went well needs none, and each
# one sent is a ZMQ message each way and a wake-up of the connector's thread (164 of the router's 1306 Python calls
# per routed request in bench/router_bench.py). In one bench/pd_interleaved.py run through the router (28 prompts),
# the decode's first token came 194 ms before to 111 ms after its prefill leg answered, before it for 17. The notice
# carries how long ago the prefill answered, so the connector still gives up on a producer that cannot reach it
# `no_show_s` after the answer (or on the notice, when `no_show_s` is shorter than this).
ANSWERED_NOTICE_AFTER_S = 0.1


@dataclass
class PrefillResult:
    """How the leg ended: `ok` when the node answered 200 (its KV is pushed or being pushed), how long it took,
    and the reply's `usage` (prompt tokens, and cached tokens when the node reports them) for the placement
    model."""
    ok: bool
    seconds: float
    usage: dict | None = None
    refusal: tuple[int, bytes] | None = None  # the node refused the request itself: its 4xx status and body


def reply_usage(raw: bytes) -> dict | None:
    try:
        usage = json.loads(raw).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


async def run_prefill(cfg: RouterConfig, registry: Registry, legs: UpstreamPool, b: Backend,
                      path: str, body: dict, headers: dict[str, str], trace: Trace, kv_addresses: list[str],
                      transfer_id: str, over: asyncio.Event, kv_wait_over: asyncio.Event) -> PrefillResult:
    """`over` is set once the leg is over on its node: its reply headers arrived (the node has finished the
    request: one token, not streamed) or the leg failed. Closing the connection would then abort nothing there.
    `kv_wait_over`: set once the decode leg no longer waits for KV (router/proxy.py, router/decode_relay.py)."""
    t0, usage, refusal = time.monotonic(), None, None
    registry.acquire(b)
    try:
        up = await post(legs, b, path, body, headers, cfg.first_byte_timeout_s)
        over.set()
        try:
            raw = await read_all(up, b, cfg.first_byte_timeout_s)
        finally:
            up.release()
        ok, why, usage = up.status == 200, f"HTTP {up.status}", reply_usage(raw)
        if up.status in REQUEST_REFUSED:
            refusal = (up.status, raw)
            why = f"refused the request: HTTP {up.status} {raw[:200].decode(errors='replace')}"
        if ok or refusal:  # it answered as a healthy node does
            registry.report_success(b)
        if ok:
            prefill_answered(registry.control, kv_addresses, transfer_id, b.up_period, ANSWERED_SEND_S,
                             ANSWERED_NOTICE_AFTER_S, kv_wait_over)
    except UpstreamFailure as e:
        over.set()
        registry.report_failure(b, e.why)
        ok, why = False, e.why
    finally:
        registry.release(b)
    trace.add("prefill_done" if ok else "prefill_refused" if refusal else "prefill_failed", f"{b.name} {why}")
    if refusal:
        log.info("prefill leg on %s %s; nothing was pushed", b.name, why)
        await cancel_transfer(registry.control, kv_addresses, transfer_id, cfg.health_timeout_s)
    elif not ok:
        PREFILL_FAILURES.labels(cfg.on_prefill_failure).inc()
        log.warning("prefill leg on %s failed (%s); the decode instance falls back by its load policy", b.name, why)
        await cancel_transfer(registry.control, kv_addresses, transfer_id, cfg.health_timeout_s)
    return PrefillResult(ok, time.monotonic() - t0, usage if ok else None, refusal)


"""One PD request: admit it, pick instances, mint a transfer id, send both legs, relay the decode leg.

The prefill leg carries `max_tokens=1` and names the decode instance's kv address; the decode leg
says KV is coming. The connector does not care which arrives first; when the decode leg goes is
`decode_dispatch`: to a busy decode node at once, to an idle one (whose engine would spin while it
waits) `decode_lead_s` before the prefill leg's predicted end (earlier when recent predictions ran long:
router/dispatch_lead.py), or once it answered if that is sooner.

Failures are sorted by whose they are (router/failures.py). A decode failure before anything was
sent to the client is retried once on another decode instance, with a fresh transfer; after the
first byte it ends the stream with an error event. Whenever an attempt ends without a complete
answer (client gone, decode failed, any error) its legs are cancelled at once: the upstream
connections are closed, which makes vLLM abort both requests, and the decode connector is told to
drop the transfer, so slots and staging come back now rather than after a TTL.
"""
from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from dataclasses import replace

from aiohttp import web

from router.admission import Admission
from router.auth import upstream_headers
from router.background import Background
from router.config import RouterConfig
from router.decode_relay import RelayOutcome, relay_stream, relay_whole
from router.dispatch_lead import DispatchLead
from router.failures import UpstreamFailure
from router.leg_bodies import decode_body, needs_aggregated, prefill_body
from router.metrics import AGGREGATED, CANCELLED, DECODE_DISPATCH, RETRIES, STREAM_ERRORS, TTFT, child
from router.openai_errors import APIError
from router.placement import Placement
from router.placement_decision import Decision
from router.pool_probe import cancel_transfer, transfer_trace
from router.prefill_leg import PrefillResult, run_prefill
from router.registry import Backend, Registry
from router.request_trace import Trace, TraceBook
from router.upstream import post
from router.upstream_client import UpstreamPool
from router.upstream_response import UpstreamResponse

MAX_ATTEMPTS = 2  # the first dispatch and one retry, only while nothing was sent
# A stream's relay stops reading at [DONE]; the chunked terminator comes right behind it. Its connection is pooled
# once that arrives (else the decode node would take a new connection for every streamed request), closed if not.
STREAM_TAIL_S = 1.0

log = logging.getLogger("kvbridge.router")


def prefill_failed(leg: asyncio.Task, request_id: str) -> web.Response:
    """on_prefill_failure=error: the prefill node's own refusal of the request (a 4xx, such as a prompt over its
    context length) as it gave it, else a 502 that says the prefill instance failed."""
    result: PrefillResult | None = leg.result() if leg.exception() is None else None
    if result is None or result.refusal is None:
        raise APIError(502, "the prefill instance failed", "upstream_error", code="prefill_failed")
    status, raw = result.refusal
    return web.Response(status=status, body=raw, content_type="application/json",
                        headers={"x-kvbridge-request-id": request_id})


class Proxy:
    def __init__(self, cfg: RouterConfig, registry: Registry, legs: UpstreamPool, backend_key: str | None) -> None:
        self.cfg, self.registry, self.legs, self.backend_key = cfg, registry, legs, backend_key
        self.traces = TraceBook(cfg.trace_history)
        self.admission = Admission(cfg.max_inflight_total, cfg.retry_after_s)
        self.background = Background()  # router/background.py: cancelled at shutdown before the legs close
        self._deferred: dict[str, int] = {}  # decode node -> requests whose decode leg waits for their prefill
        self._next_link_sample: dict[str, float] = {}  # decode node -> when it may next be asked for a receive time
        self.placement = Placement(cfg.placement, registry, cfg.policy == "prefix_aware")
        self.lead = DispatchLead(cfg.decode_lead_s, cfg.decode_lead_cover)

    async def handle(self, request: web.Request, path: str, body: dict) -> web.StreamResponse:
        self.admission.enter()
        trace = self.traces.new(f"kvb-{secrets.token_hex(16)}", path)
        headers = upstream_headers(request.headers, self.backend_key)
        tried: set[str] = set()
        last: UpstreamFailure | None = None
        try:
            for attempt in range(MAX_ATTEMPTS):
                decision = self.placement.decide(body, tried, needs_aggregated(body))
                if decision is None:
                    break
                decode = decision.decode
                trace.placement.append(decision)
                tried.add(decode.name)
                if attempt:
                    RETRIES.labels("decode").inc()
                    trace.add("retry", f"on {decode.name} after: {last}")
                try:
                    return await self._attempt(request, path, body, headers, decision, trace)
                except UpstreamFailure as e:
                    self.registry.report_failure(decode, e.why)
                    trace.add("decode_failed", str(e))
                    last = e
            if last is not None:
                raise APIError(502, f"upstream error: {last}", "upstream_error", code="upstream_failed")
            raise APIError(503, "no healthy decode instance", "service_unavailable", code="no_decode")
        except asyncio.CancelledError:
            CANCELLED.inc()
            trace.add("cancelled")
            raise
        finally:
            self.admission.leave()
            trace.add("done")
            # The trace outlives the request (trace_history of them): its decisions keep no prompt keys, which
            # grow with the prompt (~180 KB for 512 k characters); the placement model holds its own reference
            trace.placement = [replace(d, keys=[]) for d in trace.placement]

    async def _attempt(self, request: web.Request, path: str, body: dict, headers: dict[str, str],
                       decision: Decision, trace: Trace) -> web.StreamResponse:
        tid = secrets.token_hex(16)  # unguessable, as uuid4's, at a sixth of its cost
        aggregated = needs_aggregated(body)
        decode, prefill = decision.decode, decision.prefill
        prefill_task: asyncio.Task | None = None
        prefill_over, kv_wait_over = asyncio.Event(), asyncio.Event()  # kv_wait_over: router/prefill_leg.py
        if prefill is not None:
            was_idle = not self.placement.pending_requests.get(prefill.name)
            decision.prefill_eta_s = self.placement.prefill_eta_s(decision)
            prefill_task = self.background.keep(run_prefill(
                self.cfg, self.registry, self.legs, prefill, path, prefill_body(body, tid, decode.kv_address,
                                                                      self.cfg.push_key, self.cfg.push_token_ttl_s),
                headers, trace, decode.rank_addresses, tid, prefill_over, kv_wait_over))
            prefill_task.add_done_callback(lambda t: self._prefill_finished(decision, t, was_idle, trace))
            decode_leg = decode_body(body, tid)
            trace.transfer = (decode.kv_address, tid)
        elif aggregated:
            AGGREGATED.labels(aggregated).inc()
            decode_leg = dict(body)
        elif decision.reason == "no_prefill" and self.cfg.on_prefill_failure == "error":
            raise APIError(503, "no healthy prefill instance", "service_unavailable", code="no_prefill")
        else:
            decode_leg = dict(body)
        trace.add("dispatched", f"prefill={prefill.name if prefill else None} decode={decode.name}"
                  + (f" aggregated ({aggregated})" if aggregated else "") + f": {decision.why}")
        self.placement.dispatched(decision)
        up: UpstreamResponse | None = None
        outcome: RelayOutcome | None = None
        wait_s = self._decode_wait_s(decision) if prefill_task is not None else 0.0
        self.registry.acquire(decode)
        try:
            if wait_s > 0:
                ok = await self._prefill_answered(prefill_task, decode, trace, wait_s, decision.prefill_eta_s)
                DECODE_DISPATCH.labels("before_prefill_end" if ok is None else "after_prefill").inc()
                if ok is False and self.cfg.on_prefill_failure == "error":
                    return prefill_failed(prefill_task, trace.id)
                if ok is False:
                    decode_leg = dict(body)  # nothing was pushed: the decode node prefills the prompt itself
            elif prefill_task is not None:
                DECODE_DISPATCH.labels("with_prefill").inc()
                await asyncio.sleep(0)  # the prefill leg goes out first: its KV is what the decode leg waits for
            up = await post(self.legs, decode, path, decode_leg, headers, self._first_wait(body))
            if prefill_task is not None and self.cfg.on_prefill_failure == "error" and not (await prefill_task).ok:
                return prefill_failed(prefill_task, trace.id)
            if body.get("stream") and up.status == 200:  # prefill_task: its cached tokens (router/usage.py)
                outcome = await relay_stream(request, up, decode, trace.id, self.cfg.first_byte_timeout_s,
                                             self.cfg.read_timeout_s, self.cfg.client_write_timeout_s, prefill_task,
                                             kv_wait_over)
            else:
                outcome = await relay_whole(up, decode, trace.id, self._first_wait(body), prefill_task)
            if outcome.first_byte_at is not None:
                child(TTFT, path).observe(outcome.first_byte_at - trace.t0)
            self._settle(outcome, decode, trace)
            if outcome.complete and outcome.failure is None and outcome.response.status < 400:
                self._learn_after(decision, tid if prefill_task is not None else None)
            return outcome.response
        finally:
            kv_wait_over.set()  # the decode leg is over: answered in full, or closed and its transfer cancelled below
            self.registry.release(decode)
            if prefill is None:
                self.placement.computed(decision)
            # a decode node that refused the request (a 4xx of vLLM's) never read the KV pushed for it
            if outcome is None or not outcome.complete or outcome.response.status >= 400:
                self._abort_legs(up, prefill_task, decode, tid)
            else:
                up.release(STREAM_TAIL_S)
                if prefill_task is not None and not prefill_task.done() and not prefill_over.is_set():
                    self._end_unanswered_prefill(prefill_task, prefill_over, decode, tid)

    async def _prefill_answered(self, prefill_task: asyncio.Task, decode: Backend, trace: Trace,
                                wait_s: float, eta_s: float) -> bool | None:
        """Wait up to `wait_s` for the prefill leg before sending the decode leg: whether it answered, or None
        when the wait ended first (the decode leg then goes out while the prefill computes, as with_prefill)."""
        self._deferred[decode.name] = self._deferred.get(decode.name, 0) + 1
        try:  # asyncio.wait leaves the leg running: a client leaving ends it through _abort_legs, as in every case
            done, _ = await asyncio.wait({prefill_task}, timeout=None if math.isinf(wait_s) else wait_s)
            if not done:
                trace.add("decode_dispatched", f"{eta_s - wait_s:.3g} s before the prefill leg's "
                          f"predicted end, {wait_s * 1000:.0f} ms after it was sent")
                return None
            ok = prefill_task.result().ok
        except Exception:  # a fault in the leg itself, not a client leaving: the decode node prefills
            log.exception("request %s: its prefill leg raised; the decode leg computes the prompt", trace.id)
            ok = False
        finally:
            self._deferred[decode.name] -= 1
        trace.add("decode_dispatched", f"after the prefill leg ({'answered' if ok else 'failed'})")
        return ok

    def _decode_wait_s(self, decision: Decision) -> float:
        """How long this request's decode leg waits for its prefill leg's answer before it is sent anyway
        (`decode_dispatch`): 0 sends it at once, inf waits for the answer. auto: a decode node with nothing of
        ours running gets its leg `decode_lead_s` before the prefill leg's predicted end, brought forward by what
        recent predictions missed by (router/dispatch_lead.py), so it admits the request while the prompt's last
        layers compute, but spins its engine only that long; a busy one at once (its steps run anyway)."""
        if self.cfg.decode_dispatch != "auto":
            return math.inf if self.cfg.decode_dispatch == "after_prefill" else 0.0
        decode = decision.decode
        if decode.outstanding - self._deferred.get(decode.name, 0) > 0:  # others of ours run there
            return 0.0
        return self.lead.wait_s(decision.prefill_eta_s)

    def _prefill_finished(self, decision: Decision, task: asyncio.Task, was_idle: bool, trace: Trace) -> None:
        """The prefill leg ended: its node's queue shrinks, and a leg that answered teaches the placement model."""
        self.placement.computed(decision)
        if task.cancelled() or task.exception() is not None:
            return
        result: PrefillResult = task.result()
        if result.ok:
            self.lead.observe(decision.prefill_eta_s, result.seconds)  # set when the leg was sent
            note = self.placement.prefill_done(decision, result.seconds, result.usage, was_idle)
            if note:
                trace.add("prefix_index_corrected", note)

    def _learn_after(self, decision: Decision, tid: str | None) -> None:
        """A complete answer: the decode node holds the prompt now; a transfer's receive time teaches the link
        rate (asked of the decode connector in the background, off the request's path). A decode node is asked
        at most once per health interval, the cadence of its pool probe: the rate is a moving average that
        follows a changed link within a few samples, while asking about every transfer cost the router and the
        connector's I/O thread a round trip per request (0.4 ms of router_bench's p50 at concurrency 1)."""
        self.placement.served(decision)
        node, now = decision.decode.name, time.monotonic()
        if tid is None or not self.cfg.placement.learn or now < self._next_link_sample.get(node, 0.0):
            return
        self._next_link_sample[node] = now + self.cfg.health_interval_s

        async def ask() -> None:
            got = await transfer_trace(self.registry.control, decision.decode.kv_address, tid,
                                       self.cfg.health_timeout_s)
            ms = (got or {}).get("ms") or {}
            if "RECEIVING" in ms and "RECEIVED" in ms:
                self.placement.transfer_done(decision, ms["RECEIVED"] - ms["RECEIVING"])
        self.background.keep(ask())

    def _first_wait(self, body: dict) -> float:
        """A streamed answer starts with its first token; a whole one arrives when generation is done."""
        return self.cfg.first_byte_timeout_s if body.get("stream") else self.cfg.unstreamed_timeout_s

    def _settle(self, outcome: RelayOutcome, decode: Backend, trace: Trace) -> None:
        if outcome.failure is not None:
            STREAM_ERRORS.inc()
            self.registry.report_failure(decode, outcome.failure.why)
            trace.add("stream_failed", str(outcome.failure))
        elif outcome.client_gone:
            CANCELLED.inc()
            trace.add("cancelled", "client went away mid-stream")
        else:
            self.registry.report_success(decode)
            trace.add("decode_done", f"{decode.name} HTTP {outcome.response.status}")

    def _end_unanswered_prefill(self, prefill_task: asyncio.Task, over: asyncio.Event, decode: Backend,
                                tid: str) -> None:
        """The answer is complete before the prefill leg's reply. If the decode node scattered the pushed KV,
        the prefill node is done but for its reply (a short answer sent ahead of it): the leg ends on its own and
        the placement model learns from it. Otherwise the decode recomputed the prompt, and nothing will claim
        what the still-running prefill pushes: both legs are cancelled. A leg over meanwhile (answered, or
        failed and already cancelling its transfer) is left alone."""
        async def settle() -> None:
            try:
                got = await transfer_trace(self.registry.control, decode.kv_address, tid, self.cfg.health_timeout_s)
            except Exception:  # no answer is no evidence that the KV was used
                log.exception("transfer %s: asking %s whether its KV was scattered failed", tid, decode.name)
                got = None
            if (got or {}).get("state") != "SCATTERED" and not over.is_set():
                self._abort_legs(None, prefill_task, decode, tid)
        self.background.keep(settle())

    def _abort_legs(self, up: UpstreamResponse | None, prefill_task: asyncio.Task | None, decode: Backend,
                    tid: str) -> None:
        """Close the decode connection (vLLM aborts the request), cancel the prefill leg (same), and tell
        the decode connector to drop the transfer now. Runs inside cancellation, so nothing here awaits."""
        if up is not None:
            up.close()
        if prefill_task is not None:
            if not prefill_task.done():
                prefill_task.cancel()
            self.background.keep(cancel_transfer(self.registry.control, decode.rank_addresses, tid,
                                                 self.cfg.health_timeout_s))

"""The router's time-to-first-byte limits against stub backends (tests/router_stubs.py), issue 13: a node that
accepted a request and then says nothing is the node's failure, found within the configured limit, and the
request moves on while nothing was sent (the per-read limit and the 4-minute stream are in
tests/test_router_semantics.py)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest

from router.app import PROXY
from tests.router_stubs import REQ, StubNode, eventually, events, post, states


@pytest.mark.parametrize("stream", [True, False])
async def test_a_decode_silent_past_its_first_byte_limit_is_left_for_another(make, stream):
    """Streamed: headers came, the first event did not within first_byte_timeout_s; unstreamed: no answer
    within unstreamed_timeout_s. Both retried on d1 (nothing was sent), d0 only suspect, its request closed."""
    d0, d1 = StubNode("d0", mode="late", kv=True), StubNode("d1", kv=True)
    url, api = await make([StubNode("p")], [d0, d1], policy="round_robin", first_byte_timeout_s=1.0,
                          unstreamed_timeout_s=1.0)  # round robin starts at d0
    status, headers, raw = await post(url, dict(REQ, stream=stream))
    assert status == 200 and "error" not in raw.decode()
    if stream:
        assert events(raw)[-1] == "[DONE]" and json.loads(events(raw)[0])["choices"][0]["text"] == "t0"
    else:
        assert json.loads(raw)["choices"][0]["text"] == "d1"
    assert (len(d0.bodies), len(d1.bodies)) == (1, 1) and "down" not in states(api)  # suspect until a probe passes
    assert failed_phase(api, headers, "decode_failed") == "d0: timed out"
    assert await eventually(lambda: d0.aborted == 1)  # its connection closed: vLLM would abort the request


async def test_a_prefill_leg_silent_past_the_first_byte_limit_fails_and_the_decode_recomputes(make):
    """The prefill leg's 1-token answer is its first byte: past first_byte_timeout_s the leg is the prefill
    node's failure, the decode connector is told to stop waiting (CANCEL), and the answer still comes."""
    pre, dec = StubNode("p", mode="late"), StubNode("d", interval=2.0, kv=True)
    url, api = await make([pre], [dec], first_byte_timeout_s=0.5, decode_dispatch="after_prefill")
    status, headers, raw = await post(url, REQ)
    assert status == 200 and json.loads(raw)["choices"][0]["text"] == "d"
    tid = pre.bodies[0]["kv_transfer_params"]["kvbridge"]["transfer_id"]
    assert "kv_transfer_params" not in dec.bodies[0]  # sent after the failed prefill leg: it prefills itself
    assert dec.cancels == [tid] and "down" not in states(api, "prefill") and states(api) == ["up"]
    assert failed_phase(api, headers, "prefill_failed") == "p timed out"


async def test_a_node_whose_health_check_hangs_delays_no_other_nodes_check(make):
    """d0's /health stops answering (the router waits health_timeout_s = 30 s for it); meanwhile d1 fails its
    checks and passes them again: the router sees each change within a few health intervals, not 30 s later."""
    d0, d1 = StubNode("d0", kv=True), StubNode("d1", kv=True)
    url, api = await make([StubNode("p")], [d0, d1], health_interval_s=0.2, health_timeout_s=30)
    assert states(api) == ["up", "up"]
    d0.health_hangs, d1.healthy = True, False
    assert await within(3.0, lambda: states(api)[1] == "down")
    d1.healthy = True
    assert await within(3.0, lambda: states(api)[1] == "up")
    assert states(api)[0] == "up"  # its check has not ended yet: nothing is known against it


async def test_a_stream_still_receiving_events_is_not_cut_when_its_node_fails_its_health_checks(make):
    """Abandonment ends waits that lasted abandon_after_s, not a stream whose events keep coming: d0 fails /health
    from the stream's start on and is abandoned from about 1.2 s, while its events arrive every 50 ms for 3 s."""
    d0 = StubNode("d0", kv=True, events=60, interval=0.05)
    url, api = await make([StubNode("p")], [d0], abandon_after_s=1.0)
    streaming = asyncio.create_task(post(url, dict(REQ, stream=True)))
    assert await eventually(lambda: len(d0.bodies) == 1)
    d0.healthy = False
    status, _, raw = await streaming
    assert status == 200 and "error" not in raw.decode() and events(raw)[-1] == "[DONE]" and len(events(raw)) == 61
    assert states(api) == ["down"]  # its checks did fail, for longer than abandon_after_s


async def test_a_node_down_by_failed_requests_is_abandoned_only_once_its_health_checks_took_it_down(make):
    """abandon_after_s counts from the check that took the node down, not from failed requests: d0, down by three
    failed requests, fails /health from then on without its checks taking it down (unhealthy_after 100), so the
    request waiting on it is not ended."""
    d0 = StubNode("d0", mode="late", kv=True)
    url, api = await make([StubNode("p")], [d0], unhealthy_after=100, abandon_after_s=0.3)
    waiting = asyncio.create_task(post(url, REQ))
    assert await eventually(lambda: len(d0.bodies) == 1)
    registry, d0_seen = api[PROXY].registry, api[PROXY].registry.backends["decode"][0]
    d0.healthy = False
    assert await eventually(lambda: d0_seen.health_fails >= 1)  # no check that passed is still on its way
    for _ in range(3):
        registry.report_failure(d0_seen, "a failed request")
    await asyncio.sleep(1.5)  # about seven failed checks, each past abandon_after_s since the node went down
    assert states(api) == ["down"] and not waiting.done()
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting


async def within(seconds: float, cond) -> bool:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def failed_phase(api, headers, phase: str) -> str:
    """The detail of the request's `phase` event in the router's trace (why that leg failed)."""
    trace = api[PROXY].traces.get(headers["x-kvbridge-request-id"])
    return next((detail for p, detail, _ in trace.events if p == phase), f"no {phase} in {trace.events}")

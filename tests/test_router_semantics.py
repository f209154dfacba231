"""The router's semantics against in-process stub backends (tests/router_stubs.py): whose fault a failure is,
retries before the first byte only, no hang on a dead node, legs released when the client leaves, timeouts,
per-leg parameters, headers and keys, admission. `test_four_minute_stream_is_not_cut` takes 4 minutes of wall
time on purpose; skip it with `-k 'not four_minute'`."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from prometheus_client import REGISTRY

from router.app import PROXY
from tests.router_stubs import REQ, StubNode, eventually, events, post, states, transfer_id


async def test_clients_leaving_mid_stream_never_count_against_decode(make):
    pre, dec = StubNode("p"), StubNode("d", events=200, interval=0.02, kv=True)
    url, api = await make([pre], [dec])

    async def leave_after(n_events: int) -> None:
        async with aiohttp.ClientSession() as s:
            r = await s.post(url + "/v1/completions", json=dict(REQ, stream=True))
            for _ in range(n_events):
                await r.content.readuntil(b"\n\n")
            r.close()  # the client goes away mid-stream
    await asyncio.gather(*(leave_after(1 + i % 5) for i in range(24)))
    status, _, raw = await post(url, dict(REQ, stream=True))
    assert status == 200 and events(raw)[-1] == "[DONE]"
    assert states(api) == ["up"] and api[PROXY].registry.backends["decode"][0].request_fails == 0
    # every abandoned request: its decode connection closed (vLLM would abort it) and its transfer CANCELled
    assert await eventually(lambda: dec.aborted == 24 and len(dec.cancels) == 24), (dec.aborted, dec.cancels)


@pytest.mark.parametrize("dispatch", ["with_prefill", "after_prefill"])
async def test_client_leaving_during_prefill_cancels_both_legs(make, dispatch):
    pre, dec = StubNode("p", interval=30), StubNode("d", interval=30, kv=True)
    url, api = await make([pre], [dec], decode_dispatch=dispatch)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(post(url, REQ), 0.5)
    sent = dispatch == "with_prefill"  # after_prefill: the decode leg was never sent, its transfer still cancelled
    assert await eventually(lambda: (pre.aborted, dec.aborted, len(dec.bodies), dec.cancels)
                            == (1, int(sent), int(sent), [transfer_id(pre)]))
    assert states(api, "prefill") == ["up"] and states(api) == ["up"]


def dispatch_counts() -> dict[str, float]:
    return {o: REGISTRY.get_sample_value("kvbridge_router_decode_dispatch_total", {"order": o}) or 0
            for o in ("with_prefill", "before_prefill_end", "after_prefill")}


def phase_at(api, headers, phase: str) -> tuple[str, float]:
    """(detail, ms since the request came) of the request's `phase` event in the router's trace."""
    trace = api[PROXY].traces.get(headers["x-kvbridge-request-id"])
    return next((detail, ms) for p, detail, ms in trace.events if p == phase)


async def test_auto_dispatch_sends_an_idle_decode_its_leg_shortly_before_the_prefill_ends_and_a_busy_one_at_once(make):
    """An idle decode node given a request that waits for KV steps without pause (vLLM's engine loop), which
    slows a prefill computing beside it: its leg goes `decode_lead_s` before the prefill leg's predicted end
    (here 1.0 s, the configured fixed cost of a prompt, not learned), so it admits the request while the prompt
    still computes. A busy one steps anyway and takes the KV the step it lands: its leg goes at once."""
    pre, dec = StubNode("p", interval=2.0), StubNode("d", events=60, interval=0.05, kv=True)
    url, api = await make([pre], [dec], decode_lead_s=0.5, placement={"request_s": 1.0, "learn": False})
    before = dispatch_counts()
    first = asyncio.create_task(post(url, dict(REQ, stream=True)))
    await asyncio.sleep(0.3)
    assert (len(pre.bodies), len(dec.bodies)) == (1, 0)
    assert await eventually(lambda: len(dec.bodies) == 1)
    assert not first.done() and len(pre.bodies) == 1  # the prefill leg (2 s) has not answered
    second = asyncio.create_task(post(url, dict(REQ, stream=True)))
    await asyncio.sleep(0.3)
    assert (len(pre.bodies), len(dec.bodies)) == (2, 2)  # the first waits for KV there: both legs at once
    done = await asyncio.gather(first, second)
    for status, _, raw in done:
        assert status == 200 and events(raw)[-1] == "[DONE]"
    assert all("kvbridge" in b["kv_transfer_params"] for b in dec.bodies)
    detail, sent_ms = phase_at(api, done[0][1], "decode_dispatched")
    assert "before the prefill leg's predicted end" in detail and sent_ms >= 500 - 1  # 1.0 s predicted - 0.5 s
    assert sent_ms < phase_at(api, done[0][1], "prefill_done")[1]
    after = dispatch_counts()
    assert {o: after[o] - before[o] for o in after} == {"with_prefill": 1, "before_prefill_end": 1, "after_prefill": 0}


async def test_auto_dispatch_sends_the_decode_leg_sooner_once_prefill_legs_answered_before_their_prediction(make):
    """Legs predicted at 1.0 s (not learned) that answer in 0.3 s teach the router its predictions run long (router/
    dispatch_lead.py): after 8 of them an idle decode node's leg goes at half the prediction less decode_lead_s
    (0.4 s after the prefill leg), not at 0.9 s, so a prefill that ends early still finds its decode leg there."""
    times = iter([0.3] * 8 + [2.0])
    pre, dec = StubNode("p", interval=lambda body: next(times)), StubNode("d", kv=True)
    url, api = await make([pre], [dec], decode_lead_s=0.1, placement={"request_s": 1.0, "learn": False})
    for _ in range(8):
        status, headers, _ = await post(url, REQ)
        assert status == 200 and phase_at(api, headers, "decode_dispatched")[0] == "after the prefill leg (answered)"
    status, headers, _ = await post(url, REQ)
    detail, sent_ms = phase_at(api, headers, "decode_dispatched")
    assert status == 200 and detail.startswith("0.6 s before the prefill leg's predicted end") and 400 <= sent_ms < 900


async def test_auto_dispatch_waits_for_a_prefill_that_answers_before_its_predicted_end(make):
    """A prediction too long costs nothing: the leg goes when the prefill answered, as after_prefill would."""
    pre, dec = StubNode("p", interval=0.3), StubNode("d", kv=True)
    url, api = await make([pre], [dec], decode_lead_s=0.5, placement={"request_s": 5.0, "learn": False})
    before = dispatch_counts()
    status, headers, _ = await post(url, REQ)
    assert status == 200 and phase_at(api, headers, "decode_dispatched")[0] == "after the prefill leg (answered)"
    assert phase_at(api, headers, "decode_dispatched")[1] >= phase_at(api, headers, "prefill_done")[1]
    after = dispatch_counts()
    assert {o: after[o] - before[o] for o in after} == {"with_prefill": 0, "before_prefill_end": 0, "after_prefill": 1}


@pytest.mark.parametrize("scattered", [True, False])
async def test_an_answer_done_before_its_prefill_replied_cancels_that_leg_only_if_its_kv_went_unused(make, scattered):
    """A short answer can end before its prefill leg's reply: if the decode node scattered the pushed KV, the
    prefill node is done but for that reply, which ends the leg on its own (and teaches the placement model);
    if the decode recomputed the prompt, the still-running prefill is cancelled, its transfer too."""
    pre, dec = StubNode("p", interval=1.0), StubNode("d", kv=True, scattered=scattered)
    url, api = await make([pre], [dec], decode_dispatch="with_prefill")
    status, headers, _ = await post(url, REQ)
    assert status == 200
    trace = api[PROXY].traces.get(headers["x-kvbridge-request-id"])
    if scattered:
        assert await eventually(lambda: any(p == "prefill_done" for p, _, _ in trace.events))
        assert pre.aborted == 0 and dec.cancels == []
    else:
        assert await eventually(lambda: (pre.aborted, dec.cancels) == (1, [transfer_id(pre)]))
        assert not any(p == "prefill_done" for p, _, _ in trace.events)


async def test_decode_dying_mid_stream_ends_with_error_event_and_done_without_retry(make):
    d0, d1 = StubNode("d0", mode="die", events=6, kv=True), StubNode("d1", kv=True)
    url, api = await make([StubNode("p")], [d0, d1], policy="round_robin")
    status, _, raw = await post(url, dict(REQ, stream=True))  # round robin starts at d0
    ev = events(raw)
    assert status == 200 and [json.loads(e)["choices"][0]["text"] for e in ev[:2]] == ["t0", "t1"]
    assert json.loads(ev[2])["error"]["code"] == "upstream_failed" and ev[3:] == ["[DONE]"]
    assert len(d1.bodies) == 0  # never re-dispatched after the first byte
    assert states(api)[0] == "suspect"  # one failure: suspect, not down


@pytest.mark.parametrize("mode,stream", [("reset", False), ("die", True)])
async def test_failure_before_the_first_byte_is_retried_on_another_decode(make, mode, stream):
    d0, d1 = StubNode("d0", mode=mode, die_after=0, kv=True), StubNode("d1", kv=True)
    url, api = await make([StubNode("p")], [d0, d1], policy="round_robin")  # round robin starts at d0
    status, _, raw = await post(url, dict(REQ, stream=stream))
    assert status == 200 and "error" not in raw.decode() and (events(raw)[-1] == "[DONE]") == stream
    assert (len(d0.bodies), len(d1.bodies)) == (1, 1) and states(api) == ["suspect", "up"]


async def test_only_one_retry_and_the_last_decode_stays_routable(make):
    nodes = [StubNode(f"d{i}", mode="reset", kv=True) for i in range(3)]
    url, api = await make([StubNode("p")], nodes)
    status, _, raw = await post(url, REQ)
    assert status == 502 and json.loads(raw)["error"]["code"] == "upstream_failed"
    assert sum(len(n.bodies) for n in nodes) == 2 and "down" not in states(api)


async def test_request_on_a_node_that_goes_silent_ends_when_it_is_marked_down(make):
    """d0 keeps its connections open, never answers, fails /health: its requests move to d1 (nothing was sent)."""
    d0, d1 = StubNode("d0", mode="hang", kv=True), StubNode("d1", kv=True)
    url, api = await make([StubNode("p")], [d0, d1], policy="round_robin")
    replies = await asyncio.gather(*(post(url, REQ) for _ in range(8)))  # post's 30 s timeout: a hang fails
    assert [(st, json.loads(raw)["choices"][0]["text"]) for st, _, raw in replies] == [(200, "d1")] * 8
    assert len(d0.bodies) == 4 and states(api)[0] == "down"


async def test_silence_between_tokens_past_the_read_timeout_ends_the_stream(make):
    url, api = await make([StubNode("p")], [StubNode("d", mode="silent", kv=True)], read_timeout_s=1.0)
    status, _, raw = await post(url, dict(REQ, stream=True))
    ev = events(raw)
    assert status == 200 and "timed out" in json.loads(ev[-2])["error"]["message"] and ev[-1] == "[DONE]"


@pytest.mark.timeout(330)
async def test_four_minute_stream_is_not_cut(make):
    """LONG (4 min of wall time): a token every 5 s for 240 s passes whole under the default timeouts."""
    url, _ = await make([StubNode("p")], [StubNode("d", events=48, interval=5.0, kv=True)])
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=dict(REQ, stream=True),
                                                    timeout=aiohttp.ClientTimeout(total=300)) as r:
        raw = await r.read()
    assert len(ev := events(raw)) == 49 and ev[-1] == "[DONE]" and "error" not in raw.decode()


async def test_leg_parameters_and_kv_transfer_params_never_reach_the_client(make):
    pre, dec = StubNode("p"), StubNode("d", kv=True)
    url, _ = await make([pre], [dec])
    extra = {"n": 2, "min_tokens": 4, "logprobs": 2, "stream_options": {"include_usage": True}, "stream": True}
    status, _, raw = await post(url, dict(REQ, **extra))
    assert status == 200 and "kv_transfer_params" not in raw.decode()
    p, d = pre.bodies[0], dec.bodies[0]
    assert p["max_tokens"] == 1 and p["stream"] is False and not {"n", "min_tokens", "logprobs", "stream_options"} & set(p)
    assert d["n"] == 2 and d["min_tokens"] == 4 and d["kv_transfer_params"]["kvbridge"]["claims"] == 2
    assert d["kv_transfer_params"]["kvbridge"]["transfer_id"] == p["kv_transfer_params"]["kvbridge"]["transfer_id"]
    status, _, raw = await post(url, REQ)
    assert status == 200 and "kv_transfer_params" not in json.loads(raw)


@pytest.mark.parametrize("extra", [{"echo": True}, {"prompt_logprobs": 1}])
async def test_echo_and_prompt_logprobs_are_served_aggregated_on_decode(make, extra):
    pre, dec = StubNode("p"), StubNode("d", kv=True)
    url, _ = await make([pre], [dec])
    status, _, _ = await post(url, dict(REQ, **extra))
    assert status == 200 and pre.bodies == [] and "kv_transfer_params" not in dec.bodies[0]


async def test_headers_pass_to_both_legs_and_router_key_is_required(make, monkeypatch):
    monkeypatch.setenv("ROUTER_TEST_KEY", "s3cret")
    pre, dec = StubNode("p"), StubNode("d", kv=True)
    url, _ = await make([pre], [dec], api_key_env="ROUTER_TEST_KEY")
    assert (await post(url, REQ))[0] == 401
    assert (await post(url, REQ, {"Authorization": "Bearer wrong"}))[0] == 401
    sent = {"Authorization": "Bearer s3cret", "X-Request-Id": "req-42", "traceparent": "00-abc-def-01"}
    status, headers, _ = await post(url, dict(REQ, stream=True), sent)
    assert status == 200 and headers.get("X-Request-Id") == "from-d", headers
    assert [{k: leg.get(k) for k in sent} for leg in (pre.headers[0], dec.headers[0])] == [sent, sent]


class CookieSetter(StubNode):
    """A backend (or a proxy in front of it) that hands each unstreamed answer a session cookie of its own,
    reached by a host name (a cookie jar keeps no cookie from a bare IP address)."""

    def instance(self) -> dict:
        return dict(super().instance(), url=self.url.replace("127.0.0.1", "localhost"))

    async def completions(self, request):
        resp = await super().completions(request)
        resp.set_cookie("session", f"{self.name}-{len(self.bodies)}")
        return resp


async def test_a_backends_cookie_is_never_sent_on_a_later_request(make):
    """The router's upstream connections serve every client: a cookie one answer set must not ride on the
    next request, another client's perhaps."""
    pre, dec = CookieSetter("p"), CookieSetter("d", kv=True)
    url, _ = await make([pre], [dec])
    for _ in range(3):
        assert (await post(url, REQ))[0] == 200
    assert len(pre.headers) == len(dec.headers) == 3
    assert [h.get("Cookie") for h in pre.headers + dec.headers] == [None] * 6


async def test_models_proxied_and_admin_routes_on_their_own_port(make, unused_tcp_port):
    url, _ = await make([StubNode("p")], [StubNode("d", kv=True)], admin_port=unused_tcp_port)
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/v1/models") as r:
            m = (await r.json())["data"][0]
        assert (m["root"], m["max_model_len"], m["permission"]) == ("/models/tiny", 2048, [{}])
        async with s.get(url + "/metrics") as r:
            assert r.status == 404
        async with s.get(f"http://127.0.0.1:{unused_tcp_port}/metrics") as r:
            assert r.status == 200 and "kvbridge_router_requests_total" in await r.text()
        rid = (await post(url, REQ))[1]["x-kvbridge-request-id"]
        async with s.get(f"{url}/debug/requests/{rid}") as r:
            assert r.status == 404
        async with s.get(f"http://127.0.0.1:{unused_tcp_port}/debug/requests/{rid}") as r:
            assert r.status == 200 and (await r.json())["id"] == rid


@pytest.mark.parametrize("caps", [{"max_inflight_total": 2}, {"max_inflight_per_instance": 2}])
async def test_past_the_cap_a_429_with_retry_after(make, caps):
    dec = StubNode("d", interval=2.0, kv=True)
    url, _ = await make([StubNode("p")], [dec], retry_after_s=3, **caps)
    held = [asyncio.create_task(post(url, REQ)) for _ in range(2)]
    while len(dec.bodies) < 2:  # both admitted and waiting on the decode
        await asyncio.sleep(0.01)
    status, headers, raw = await post(url, REQ)
    assert status == 429 and headers["Retry-After"] == "3" and json.loads(raw)["error"]["code"] == "at_capacity"
    assert [r[0] for r in await asyncio.gather(*held)] == [200, 200]

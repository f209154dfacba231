"""The router in front of real vLLM prefill/decode: OpenAI client parity, bad and hostile input, a decode
node dying."""
from __future__ import annotations

import json
import socket
import time

import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launch.polling import wait_for
from launch.tiny_prompts import random_words
from router.app import MAX_BODY
from tests.pd_client import pool_status, wait_producer_idle

pytestmark = pytest.mark.usefixtures("decode_pool_full_after")


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(url: str, text: str, stream: bool, max_tokens: int = 16) -> str:
    msgs = [{"role": "user", "content": text}]
    c = client(url)
    if not stream:
        return c.chat.completions.create(model="tiny", messages=msgs, max_tokens=max_tokens,
                                         temperature=0).choices[0].message.content
    parts = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=max_tokens, temperature=0,
                                      stream=True)
    return "".join(p.choices[0].delta.content or "" for p in parts if p.choices)


def complete(url: str, prompt: str, stream: bool, max_tokens: int = 16) -> str:
    c = client(url)
    if not stream:
        return c.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text
    return "".join(p.choices[0].text for p in c.completions.create(model="tiny", prompt=prompt,
                                                                     max_tokens=max_tokens, temperature=0,
                                                                     stream=True))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("words", [20, 350])
def test_openai_client_same_text_as_aggregated(servers, router, stream, words):
    text = random_words(words, seed=words + 1)
    assert complete(router.url, text, stream) == complete(servers["agg"].url, text, False)
    assert chat(router.url, text, stream) == chat(servers["agg"].url, text, False)


@pytest.mark.parametrize("stream", [False, True])
def test_usage_reports_cached_tokens_as_aggregated_does(servers, router, stream):
    """vLLM counts KV a connector loaded as cached: the decode node would report the whole fresh prompt as cached;
    the router reports the prefill node's hit, as aggregated vLLM reports its own (router/usage.py)."""
    body = {"model": "tiny", "prompt": random_words(300, seed=41 + stream), "max_tokens": 4, "temperature": 0}
    want = requests.post(servers["agg"].url + "/v1/completions", json=body, timeout=120).json()["usage"]
    before = pool_status(servers["decode"].handshake).counters.get("transfers_scattered", 0)
    if stream:
        r = requests.post(router.url + "/v1/completions", json=dict(body, stream=True, stream_options={
            "include_usage": True}), timeout=120)
        chunks = [json.loads(e.removeprefix("data: ")) for e in r.text.split("\n\n") if e.startswith("data: {")]
        got = next(c["usage"] for c in chunks if c.get("usage"))
    else:
        got = requests.post(router.url + "/v1/completions", json=body, timeout=120).json()["usage"]
    assert pool_status(servers["decode"].handshake).counters.get("transfers_scattered", 0) == before + 1, "over PD"
    assert want["prompt_tokens_details"]["cached_tokens"] == 0, "a fresh prompt"
    assert (got["prompt_tokens"], got["prompt_tokens_details"]["cached_tokens"]) == (want["prompt_tokens"], 0)


def test_values_vllm_reads_leniently_are_read_so_by_the_router_too(servers, router):
    """`"stream": "true"`, `"max_tokens": "8"` and `"n": "2"` are what vLLM reads as true, 8 and 2: the router
    streams the answer and gives the decode two claims on the transfer, so both choices are aggregated's."""
    body = {"model": "tiny", "prompt": random_words(200, seed=5), "max_tokens": "8", "n": "2", "seed": 5,
            "temperature": 0.9, "stream": "true"}
    texts = {0: "", 1: ""}
    with requests.post(router.url + "/v1/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    texts[choice["index"]] += choice["text"]
    want = requests.post(servers["agg"].url + "/v1/completions", json=dict(body, stream=False), timeout=60).json()
    assert texts == {c["index"]: c["text"] for c in want["choices"]} and texts[0]


def test_client_kv_transfer_params_are_not_trusted(servers, router):
    prompt = random_words(200, seed=3)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "kv_transfer_params": {"kvbridge": {"transfer_id": "evil", "push_to": "10.0.0.1:1"}}}
    r = requests.post(router.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == complete(servers["agg"].url, prompt, False, 8)


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b'["a list"]', 400, None),
    (b'{"model": "gpt-17", "prompt": "hi"}', 404, "model"),
    (b'{"model": "tiny", "prompt": "hi", "seed": ' + b"1" * 5000 + b"}", 400, None),
    (b'{"model": "tiny"}', 400, "prompt"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": -1}', 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": "many"}', 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": "hi", "stream": "sometimes"}', 400, "stream"),
])
def test_bad_requests_get_openai_errors(router, body, status, param):
    r = requests.post(router.url + "/v1/completions", data=body, headers={"content-type": "application/json"},
                      timeout=10)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param
    ok = requests.post(router.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                       timeout=60)
    assert ok.status_code == 200


def test_bad_chat_request(router):
    r = requests.post(router.url + "/v1/chat/completions", json={"model": "tiny", "messages": "hi"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_models_health_metrics_trace(router):
    assert requests.get(router.url + "/v1/models", timeout=5).json()["data"][0]["id"] == "tiny"
    health = requests.get(router.url + "/health", timeout=5).json()
    assert all(i["healthy"] for kind in health["instances"].values() for i in kind)
    r = requests.post(router.url + "/v1/completions", json={"model": "tiny", "prompt": "trace me", "max_tokens": 2},
                      timeout=60)
    trace = requests.get(f"{router.url}/debug/requests/{r.headers['x-kvbridge-request-id']}", timeout=5).json()
    assert [e["phase"] for e in trace["events"]][0] == "dispatched" and trace["events"][-1]["phase"] == "done"
    conn = trace["decode_connector"]  # the decode connector's own phases, under the state machine's names
    assert conn["state"] == "SCATTERED" and {"EXPECTED", "RECEIVED", "SCATTERED"} <= set(conn["ms"]), conn
    assert conn["ms"]["EXPECTED"] <= conn["ms"]["RECEIVED"] <= conn["ms"]["SCATTERED"]
    assert "kvbridge_router_requests_total" in requests.get(router.url + "/metrics", timeout=5).text


@pytest.mark.parametrize("extra", [{"echo": True, "logprobs": 1}, {"prompt_logprobs": 2}])
def test_echo_and_prompt_logprobs_are_served_whole_on_decode_as_aggregated(servers, router, extra):
    """Transferred KV carries no prompt logits: these are computed on the decode node (no prefill leg, no
    transfer) and answer exactly what an aggregated server does."""
    body = {"model": "tiny", "prompt": random_words(40, seed=77), "max_tokens": 8, "temperature": 0, **extra}
    r = requests.post(router.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got, want = r.json()["choices"][0], post_json(servers["agg"].url, body)["choices"][0]
    assert got["text"] == want["text"] and got["text"].startswith(body["prompt"]) == ("echo" in extra)
    for field in ("logprobs", "prompt_logprobs"):
        assert (got.get(field) is None) == (want.get(field) is None), field
    if "prompt_logprobs" in extra:
        assert [p and sorted(p) for p in got["prompt_logprobs"]] == [p and sorted(p) for p in want["prompt_logprobs"]]
    trace = requests.get(f"{router.url}/debug/requests/{r.headers['x-kvbridge-request-id']}", timeout=5).json()
    dispatched = next(e["detail"] for e in trace["events"] if e["phase"] == "dispatched")
    assert "prefill=None" in dispatched and "aggregated" in dispatched, dispatched


def post_json(url: str, body: dict) -> dict:
    return requests.post(url + "/v1/completions", json=body, timeout=60).json()


def wait_health(router, healthy: bool, timeout: float) -> None:
    """Until the router's /health says its decode node is (or is not) healthy."""
    wait_for(lambda: requests.get(router.url + "/health", timeout=5).json()["instances"]["decode"][0]["healthy"]
             == healthy, timeout, what=f"router seeing decode {'healthy' if healthy else 'unhealthy'}")


def long_stream_cut_by_kill9(router, decode) -> tuple[list[bytes], list[int], float]:
    """A long streamed answer whose decode node is kill -9'd once its first token arrived (so it is generating
    it: a fixed sleep let a loaded run finish it first), while three prefills push. Returns the events after the
    first, the pushes' status codes and when the kill came."""
    import concurrent.futures as cf
    body = {"model": "tiny", "prompt": random_words(100, seed=5), "max_tokens": 1700, "temperature": 0,
            "ignore_eos": True, "stream": True}  # seconds of decoding here
    pushes = [{"model": "tiny", "prompt": random_words(1200, seed=50 + i), "max_tokens": 4} for i in range(3)]
    with cf.ThreadPoolExecutor(3) as ex, \
            requests.post(router.url + "/v1/completions", json=body, stream=True, timeout=60) as long:
        events = (line for line in long.iter_lines() if line.startswith(b"data: "))
        first = next(events)
        mid = [ex.submit(requests.post, router.url + "/v1/completions", json=b, timeout=60) for b in pushes]
        time.sleep(0.05)  # their prefills are computing and pushing
        decode.kill9()
        t_kill = time.monotonic()
        rest = list(events)
        outcomes = [f.result().status_code for f in mid]
    assert long.status_code == 200 and b'"text"' in first
    return rest, outcomes, t_kill


def restart(decode, router) -> None:
    """The decode node running again (if it is down) and healthy in the router's eyes."""
    if decode.proc.poll() is not None:
        decode.start()
        decode.wait_ready()
    wait_health(router, True, 10)


def test_decode_killed_mid_request_then_recovers(servers, router, failure_report):
    """kill -9 of the decode node while it streams an answer: the stream ends with an OpenAI error event, not
    as if the answer were whole; the router marks the node unhealthy; after restart (a new incarnation on the
    same address) the prefill node reconnects on its own and PD works again. A machine that stalled the test for
    the seconds the answer takes (its last event says finish_reason length) gets one more try."""
    decode = servers["decode"]
    old_incarnation = pool_status(decode.handshake).incarnation
    try:
        rest, outcomes, t_kill = long_stream_cut_by_kill9(router, decode)
        if len(rest) > 1 and b'"finish_reason":"length"' in rest[-2]:
            restart(decode, router)
            rest, outcomes, t_kill = long_stream_cut_by_kill9(router, decode)
        assert all(code in (200, 502, 503) for code in outcomes), outcomes
        assert len(rest) < 1700, f"the answer was whole: the kill came after it; it ended {rest[-2:]}"
        assert rest[-1] == b"data: [DONE]" and json.loads(rest[-2][6:])["error"]["message"], rest[-3:]
        wait_health(router, False, 5)
        detect = time.monotonic() - t_kill  # until /health says unhealthy
        cleanup = wait_producer_idle(servers["prefill"], 15)  # staging slots back, no transfer left behind
        r = requests.post(router.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                          timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_decode"
    finally:  # restarted even when an assertion failed: the tests after this one share the decode node
        t_restart = time.monotonic()
        restart(decode, router)
    assert pool_status(decode.handshake).incarnation != old_incarnation
    text = random_words(300, seed=6)
    assert complete(router.url, text, False) == complete(servers["agg"].url, text, False)
    assert pool_status(decode.handshake).counters.get("transfers_scattered", 0) == 1
    failure_report("kill -9 decode mid-request (3 prefills pushing)", f"the stream ended with an OpenAI error "
                   f"event after {len(rest) - 2} more tokens; router marked decode unhealthy; prefill staging all "
                   f"free {cleanup:.1f}s after; restarted decode reconnected by the prefill on its own", detect,
                   time.monotonic() - t_restart, "none: prefill staging full, no producer transfer left")


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                           | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=8)
request_bodies = st.dictionaries(st.sampled_from(["model", "prompt", "messages", "max_tokens", "stream", "n",
                                                  "temperature", "kv_transfer_params", "stop", "logprobs"]),
                                 json_values, max_size=6)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       raw=st.one_of(st.binary(max_size=200), request_bodies.map(lambda d: json.dumps(d).encode())),
       ctype=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]))
def test_hostile_http_bodies_get_4xx_and_the_router_keeps_serving(router, path, raw, ctype):
    r = requests.post(router.url + path, data=raw, headers={"content-type": ctype}, timeout=60)
    assert r.status_code < 500, (raw, r.status_code, r.text[:200])
    if r.status_code >= 400:
        assert r.json()["error"]["message"]


def test_hostile_http_framing_and_paths(router):
    host, port = router.url.removeprefix("http://").split(":")
    for junk in (b"\x00\xff" * 100 + b"\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999\r\n\r\nshort",
                 b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            try:
                s.recv(4096)
            except (TimeoutError, ConnectionResetError):
                pass
    big = requests.post(router.url + "/v1/completions", data=b"x" * (MAX_BODY + 1),
                        headers={"content-type": "application/json"}, timeout=30)
    assert big.status_code == 413
    for p in ("/debug/requests/%00%ff", "/debug/requests/" + "a" * 5000, "/v1/nothing", "/../../etc/passwd"):
        assert 400 <= requests.get(router.url + p, timeout=5).status_code < 500
    ok = requests.post(router.url + "/v1/completions", json={"model": "tiny", "prompt": "still here", "max_tokens": 2},
                       timeout=60)
    assert ok.status_code == 200

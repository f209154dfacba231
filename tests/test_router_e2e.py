"""The router in front of real vLLM prefill/decode: OpenAI client parity, bad input, a decode node dying."""
from __future__ import annotations

import time

import openai
import pytest
import requests

from tests.pd_client import pool_status, random_words

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
    (b'{"prompt": "hi"}', 400, "model"),
    (b'{"model": "tiny"}', 400, "prompt"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": 1000000000}', 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": "many"}', 400, "max_tokens"),
    (b'{"model": "tiny", "prompt": "hi", "stream": "yes"}', 400, "stream"),
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
    assert "kvbridge_router_requests_total" in requests.get(router.url + "/metrics", timeout=5).text


def wait_health(router, healthy: bool, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        h = requests.get(router.url + "/health", timeout=5).json()
        if h["instances"]["decode"][0]["healthy"] == healthy:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"decode never became {'healthy' if healthy else 'unhealthy'}")


def test_decode_killed_mid_request_then_recovers(servers, router):
    """kill -9 of the decode node: clean error, router marks it unhealthy; after restart (a new incarnation
    on the same address) the prefill node reconnects on its own and PD works again."""
    import concurrent.futures as cf
    decode = servers["decode"]
    old_incarnation = pool_status(decode.handshake).incarnation
    body = {"model": "tiny", "prompt": random_words(300, seed=5), "max_tokens": 1200, "temperature": 0,
            "ignore_eos": True}
    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(requests.post, router.url + "/v1/completions", json=body, timeout=60)
        time.sleep(0.5)
        decode.kill9()
        r = fut.result()
    assert r.status_code in (502, 503) and r.json()["error"]["message"]
    wait_health(router, False, 5)
    r = requests.post(router.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                      timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_decode"
    decode.start()
    decode.wait_ready()
    wait_health(router, True, 10)
    assert pool_status(decode.handshake).incarnation != old_incarnation
    text = random_words(300, seed=6)
    assert complete(router.url, text, False) == complete(servers["agg"].url, text, False)
    assert pool_status(decode.handshake).counters.get("transfers_scattered", 0) == 1

"""Failure handling with real vLLM: pool exhaustion, an abort storm, kill -9 of the prefill node."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import random
import time
import uuid

import aiohttp
import pytest
import requests

from tests.pd_client import pd_request, pool_status, post, random_token_prompt, text_of
from tests.servers import VllmServer

pytestmark = pytest.mark.usefixtures("decode_pool_full_after")


def kv_usage(url: str) -> float:
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:kv_cache_usage_perc"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vllm:kv_cache_usage_perc not exported")


def wait_kv_free(url: str, timeout: float = 10) -> float:
    end = time.monotonic() + timeout
    while (u := kv_usage(url)) > 0 and time.monotonic() < end:
        time.sleep(0.2)
    return u


def test_pool_exhaustion_everything_completes_correctly(servers):
    """12 x 1000-token prompts need 48 slots; the decode pool has 32. Nobody hangs, every answer is right."""
    bodies = [{"model": "tiny", "prompt": random_token_prompt(1000, seed=200 + i), "max_tokens": 8,
               "temperature": 0} for i in range(12)]
    with cf.ThreadPoolExecutor(12) as ex:
        wants = list(ex.map(lambda b: text_of(post(servers["agg"].url, "/v1/completions", b)[1]), bodies))
        t0 = time.monotonic()
        got = list(ex.map(lambda b: pd_request(servers, "/v1/completions", b), bodies))
    assert time.monotonic() - t0 < 60
    for (pre, dec), want in zip(got, wants):
        assert pre[0] == 200 and dec[0] == 200
        assert text_of(dec[1]) == want
    assert wait_kv_free(servers["decode"].url) == 0 and wait_kv_free(servers["prefill"].url) == 0


def test_abort_storm_releases_everything(servers, router):
    """80 requests through the router, a fifth of the clients disconnect at random points."""
    rng = random.Random(1)
    bodies = [{"model": "tiny", "prompt": random_token_prompt(rng.choice([100, 400, 900]), seed=300 + i),
               "max_tokens": 24, "temperature": 0} for i in range(80)]
    cancel_after = {i: rng.uniform(0.0, 1.5) for i in rng.sample(range(80), 16)}

    async def storm() -> list[tuple[int, str | None]]:
        async with aiohttp.ClientSession() as s:
            async def one(i: int) -> tuple[int, str | None]:
                async def go() -> str:
                    async with s.post(router.url + "/v1/completions", json=bodies[i]) as r:
                        assert r.status == 200, await r.text()
                        return (await r.json())["choices"][0]["text"]
                if i in cancel_after:
                    try:
                        return i, await asyncio.wait_for(go(), cancel_after[i])
                    except asyncio.TimeoutError:
                        return i, None
                return i, await go()
            return await asyncio.gather(*(one(i) for i in range(80)))

    results = asyncio.run(storm())
    completed = [(i, t) for i, t in results if t is not None]
    assert len(completed) >= 64
    for i, text in rng.sample(completed, 20):
        assert text == text_of(post(servers["agg"].url, "/v1/completions", bodies[i])[1])
    assert wait_kv_free(servers["decode"].url, 20) == 0
    assert wait_kv_free(servers["prefill"].url, 20) == 0


def test_prefill_killed_decode_recomputes_then_reconnects(servers):
    """kill -9 of the prefill node mid-request: decode recomputes (correct tokens) within the bound and its
    slots return; the restarted prefill (new incarnation) is accepted by the decode node without a restart."""
    body = {"model": "tiny", "prompt": random_token_prompt(1500, seed=77), "max_tokens": 8, "temperature": 0}
    want = text_of(post(servers["agg"].url, "/v1/completions", body)[1])
    tid = uuid.uuid4().hex
    pre_body = dict(body, max_tokens=1, kv_transfer_params={"kvbridge": {"transfer_id": tid,
                                                                         "push_to": servers["decode"].handshake}})
    dec_body = dict(body, kv_transfer_params={"kvbridge": {"transfer_id": tid, "receive": True}})
    try:
        with cf.ThreadPoolExecutor(2) as ex:
            t0 = time.monotonic()
            pre = ex.submit(post, servers["prefill"].url, "/v1/completions", pre_body)
            dec_fut = ex.submit(post, servers["decode"].url, "/v1/completions", dec_body)
            time.sleep(0.05)
            servers["prefill"].kill9()
            dec = dec_fut.result()
            with pytest.raises(requests.RequestException):
                pre.result()  # the prefill leg dies with its node
        took = time.monotonic() - t0
        assert dec[0] == 200 and text_of(dec[1]) == want
        assert took < 4.0 + 5.0, f"took {took:.1f}s; bound is load_timeout_s (4) + 5"
    finally:
        servers["prefill"].start()  # later tests share this node
        servers["prefill"].wait_ready()
    before = pool_status(servers["decode"].handshake).counters.get("transfers_scattered", 0)
    pre, dec = pd_request(servers, "/v1/completions", body)
    assert pre[0] == 200 and dec[0] == 200 and text_of(dec[1]) == want
    assert pool_status(servers["decode"].handshake).counters["transfers_scattered"] == before + 1


@pytest.fixture(scope="module")
def decode_fail_policy(tiny_model):
    s = VllmServer("decode-failpolicy", "kv_consumer", {"load_timeout_s": 2.0, "num_slots": 4}, policy="fail")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_fail_policy_gives_a_clean_error_in_bounded_time(servers, decode_fail_policy):
    body = {"model": "tiny", "prompt": random_token_prompt(300, seed=9), "max_tokens": 8, "temperature": 0,
            "kv_transfer_params": {"kvbridge": {"transfer_id": uuid.uuid4().hex, "receive": True}}}
    t0 = time.monotonic()
    r = requests.post(decode_fail_policy.url + "/v1/completions", json=body, timeout=60)
    took = time.monotonic() - t0
    assert took < 2.0 + 5.0
    assert r.status_code >= 400 or r.json()["choices"][0]["finish_reason"] == "error", r.text
    ok = requests.post(decode_fail_policy.url + "/v1/completions",
                       json={"model": "tiny", "prompt": "still serving", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
    st = pool_status(decode_fail_policy.handshake)
    assert st.free == st.total and st.counters.get("transfers_expired") == 1

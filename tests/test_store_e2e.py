"""The tiered store inside real vLLM: a shared prefix is loaded, not recomputed, and the answer is the same.

prefill-0 (tests/conftest.py) runs with the store (memory + disk + Redis) and without vLLM's own
prefix cache, so every skipped token below came from the store. vLLM's counters say where each
prompt token's KV came from; the connector's own metrics say which tier served it.
"""
from __future__ import annotations

import redis

from launch.polling import wait_for
from launch.tiny_prompts import random_token_prompt
from tests.pd_client import connector_metrics, pd_request, post, source_tokens, text_of

CHUNK = 256


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def complete(url: str, prompt: list[int]) -> str:
    status, reply = post(url, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 8,
                                                  "temperature": 0})
    assert status == 200, reply
    return text_of(reply)


def test_shared_prefix_is_loaded_from_the_store(servers, decode_pool_full_after):
    pre, agg = servers["prefill"], servers["agg"]
    prefix = random_token_prompt(1000, 501)
    first = prefix + random_token_prompt(100, 502)
    assert complete(pre.url, first) == complete(agg.url, first)

    second = prefix + random_token_prompt(130, 503)
    src0, m0 = source_tokens(pre.url), connector_metrics(pre)
    assert complete(pre.url, second) == complete(agg.url, second), "store-loaded KV must give the same tokens"
    src1, m1 = source_tokens(pre.url), connector_metrics(pre)
    shared = (1000 // CHUNK) * CHUNK  # whole chunks of the shared prefix: 768 tokens
    assert delta(src1, src0, "external_kv_transfer") == shared
    assert delta(src1, src0, "local_compute") == len(second) - shared
    assert delta(m1, m0, 'kvbridge_store_prompt_tokens_total{outcome="loaded"}') == shared
    assert delta(m1, m0, 'kvbridge_store_hits_total{tier="memory"}') == shared // CHUNK

    # The same prefix on the PD path: the prefill node loads it from the store, then pushes everything.
    third = prefix + random_token_prompt(60, 504)
    src2 = source_tokens(pre.url)
    _, (status, reply) = pd_request(servers, "/v1/completions", {"model": "tiny", "prompt": third, "max_tokens": 8,
                                                                 "temperature": 0})
    assert status == 200 and text_of(reply) == complete(agg.url, third)
    assert delta(source_tokens(pre.url), src2, "external_kv_transfer") == shared


def test_a_salted_request_neither_uses_nor_fills_the_store(servers):
    """KV is not a function of the token ids alone under a cache salt (or LoRA, images, embeddings)."""
    pre, agg = servers["prefill"], servers["agg"]
    prefix = random_token_prompt(600, 701)
    assert complete(pre.url, prefix + [5, 6, 7]) == complete(agg.url, prefix + [5, 6, 7])
    src0, m0 = source_tokens(pre.url), connector_metrics(pre)
    status, reply = post(pre.url, "/v1/completions", {"model": "tiny", "prompt": prefix + [8, 9], "max_tokens": 8,
                                                      "temperature": 0, "cache_salt": "tenant-a"})
    assert status == 200, reply
    src1, m1 = source_tokens(pre.url), connector_metrics(pre)
    assert delta(src1, src0, "external_kv_transfer") == 0
    assert delta(m1, m0, 'kvbridge_store_prompt_tokens_total{outcome="saved"}') == 0


def test_store_survives_a_prefill_restart_through_its_disk_tier(servers, redis_url, decode_pool_full_after):
    pre, agg = servers["prefill"], servers["agg"]
    prefix = random_token_prompt(1000, 601)
    first = prefix + random_token_prompt(40, 602)
    before, r = connector_metrics(pre), redis.Redis.from_url(redis_url)
    in_redis = len(r.keys("kvbridge:chunk:*"))
    assert complete(pre.url, first) == complete(agg.url, first)
    written = 4 * CHUNK * 2 * 2 * 2 * 32 * 4  # 4 whole chunks x 2 layers x K,V x 2 heads x 32 x fp32
    wait_for(lambda: delta(connector_metrics(pre), before, 'kvbridge_store_written_bytes_total{tier="disk"}')
             >= written, 20, what="background writes reaching the disk tier")
    wait_for(lambda: len(r.keys("kvbridge:chunk:*")) >= in_redis + 4, 20, what="and Redis, for other nodes")

    pre.stop()
    pre.start()
    pre.wait_ready()
    second = prefix + random_token_prompt(90, 603)
    src0 = source_tokens(pre.url)
    assert complete(pre.url, second) == complete(agg.url, second)
    src1, m1 = source_tokens(pre.url), connector_metrics(pre)
    shared = (1000 // CHUNK) * CHUNK
    assert delta(src1, src0, "external_kv_transfer") == shared
    # a fresh process reads each chunk from disk: prefetched after the lookup, or by the load itself — and by
    # both when the prefetch outlasts the load's prefetch_wait_s (0.5 s; seen once in a whole-suite run: 5
    # disk hits for 3 chunks, the engine just restarted on two loaded cores)
    hits = m1.get('kvbridge_store_hits_total{tier="disk"}', 0)
    assert shared // CHUNK <= hits <= 2 * shared // CHUNK, f"a fresh process reads from disk: {hits} disk hits"


def test_a_stopped_redis_costs_misses_not_engine_time(servers, redis_url):
    """Redis SIGSTOPped during prefix reuse: answers stay right, memory hits still load, and no lookup waits
    for Redis's socket timeout (which every lookup used to pay at least once after a stop): the store gives
    Redis its budget (20 ms) and answers without it. This suite's Redis socket timeout (2 s) is longer than
    the scheduler's lookup timeout (1 s), so a lookup that waited on the socket would time out; the time a
    lookup takes as the scheduler sees it also counts the engine's steps, which a loaded 2-core machine can
    stretch to half a second, so that is not what is checked."""
    import os
    import signal

    pre, agg = servers["prefill"], servers["agg"]
    prefix = random_token_prompt(1000, 801)
    assert complete(pre.url, prefix + [3, 4]) == complete(agg.url, prefix + [3, 4])
    asked, timed_out, late = ('kvbridge_store_lookup_seconds_count{answer="asked"}',
                              'kvbridge_store_lookup_seconds_count{answer="timed_out"}',
                              'kvbridge_store_late_answers_total{tier="redis"}')
    m0 = connector_metrics(pre)
    pid = redis.Redis.from_url(redis_url).info("server")["process_id"]
    os.kill(pid, signal.SIGSTOP)
    try:
        for i in range(3):
            prompt = (prefix if i < 2 else random_token_prompt(600, 802)) + random_token_prompt(50, 810 + i)
            src0 = source_tokens(pre.url)
            assert complete(pre.url, prompt) == complete(agg.url, prompt), "a stopped Redis changed an answer"
            if i < 2:
                assert delta(source_tokens(pre.url), src0, "external_kv_transfer") == (1000 // CHUNK) * CHUNK
    finally:
        os.kill(pid, signal.SIGCONT)
    m1 = connector_metrics(pre)
    assert delta(m1, m0, late) >= 1, "no lookup asked the stopped Redis: the test did not test the budget"
    assert delta(m1, m0, timed_out) == 0, "a lookup waited on the stopped Redis"
    assert delta(m1, m0, asked) >= 3

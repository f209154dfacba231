"""Scheduling attempts and the kv_both role, with real vLLM.

A prefill node with a KV cache of 8 blocks (7 usable) and prefill chunks of 256 tokens must preempt: two
700-token prompts each need 6 blocks, and the scheduler admits a prompt on its first chunk's
blocks (`--no-scheduler-reserve-full-isl`). A preempted request's push ends (its staging and lease freed)
and the rescheduled request pushes anew; nothing of the first attempt reaches the decode node.
"""
from __future__ import annotations

import concurrent.futures as cf
import uuid

import pytest
import requests

from launch.local_servers import free_port, start_vllm
from launch.tiny_prompts import random_token_prompt
from tests.conftest import PREFILL_EXTRA
from tests.pd_client import post, text_of, wait_producer_idle

pytestmark = pytest.mark.usefixtures("decode_pool_full_after")


@pytest.fixture(scope="module")
def small_prefill(servers):
    s = start_vllm("prefill-small", "prefill", dict(PREFILL_EXTRA, metrics_port=free_port()), max_model_len=896,
                   vllm_args=("--no-enable-prefix-caching", "--num-gpu-blocks-override", "8",
                              "--max-num-batched-tokens", "512", "--long-prefill-token-threshold", "256",
                              "--no-scheduler-reserve-full-isl"))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def both_node(servers):
    s = start_vllm("both-0", "both", {"checksum": True, "load_timeout_s": 4.0, "num_slots": 16})
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def preemptions(url: str) -> float:
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:num_preemptions_total"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def pd(prefill_url: str, decode_url: str, push_to: str, body: dict) -> tuple[int, dict]:
    tid = uuid.uuid4().hex
    with cf.ThreadPoolExecutor(2) as ex:
        pre = ex.submit(post, prefill_url, "/v1/completions",
                        dict(body, max_tokens=1, kv_transfer_params={"kvbridge": {"transfer_id": tid,
                                                                                  "push_to": push_to}}))
        dec = post(decode_url, "/v1/completions",
                   dict(body, kv_transfer_params={"kvbridge": {"transfer_id": tid, "receive": True}}))
        assert pre.result()[0] == 200
    return dec


def test_preempted_prefills_push_a_fresh_attempt_and_every_answer_is_right(servers, small_prefill):
    # Preemption needs two prompts computing at once. Under load the API server may hand the engine one
    # prompt only after another one's prefill ended; then a fresh round of prompts is sent, each one checked.
    before = preemptions(small_prefill.url)
    for round_ in range(4):
        bodies = [{"model": "tiny", "prompt": random_token_prompt(700, seed=6100 + 10 * round_ + i), "max_tokens": 8,
                   "temperature": 0} for i in range(4)]
        wants = [text_of(post(servers["agg"].url, "/v1/completions", b)[1]) for b in bodies]
        with cf.ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda b: pd(small_prefill.url, servers["decode"].url, servers["decode"].handshake, b),
                              bodies))
        assert [(s, text_of(r)) for s, r in got] == [(200, w) for w in wants], f"round {round_}"
        if preemptions(small_prefill.url) > before:
            break
    assert preemptions(small_prefill.url) > before, "the setup must make the prefill node preempt"
    wait_producer_idle(small_prefill)


def test_kv_both_node_serves_as_decode_and_as_prefill(servers, both_node):
    body = {"model": "tiny", "prompt": random_token_prompt(400, seed=6200), "max_tokens": 8, "temperature": 0}
    want = text_of(post(servers["agg"].url, "/v1/completions", body)[1])
    status, reply = pd(servers["prefill"].url, both_node.url, both_node.handshake, body)
    assert status == 200 and text_of(reply) == want
    status, reply = pd(both_node.url, servers["decode"].url, servers["decode"].handshake, body)
    assert status == 200 and text_of(reply) == want

"""OpenAI requests that vLLM turns into several engine requests, through PD, equal aggregated vLLM.

Both legs go straight to the servers (as the router sends them: the prefill leg with n=1 and one
token, the decode leg with `claims = n`), so these tests hold the connector to its promise on its
own: every engine request gets its own prompt's KV (or recomputes), never a neighbour's.
"""
from __future__ import annotations

import concurrent.futures as cf
import uuid

import pytest

from launch.tiny_prompts import random_token_prompt, random_words
from tests.pd_client import pool_status, post

pytestmark = pytest.mark.usefixtures("decode_pool_full_after")
_pool = cf.ThreadPoolExecutor(4)
PREFILL_ONLY = ("n", "best_of", "min_tokens", "stream_options", "logprobs", "top_logprobs", "seed")


def pd_fanout(servers: dict, path: str, body: dict) -> tuple[int, dict]:
    """Both legs at once; the prefill leg carries only what a 1-token prefill needs."""
    tid = uuid.uuid4().hex
    pre = {k: v for k, v in body.items() if k not in PREFILL_ONLY}
    pre.update(max_tokens=1, stream=False,
               kv_transfer_params={"kvbridge": {"transfer_id": tid, "push_to": servers["decode"].handshake}})
    dec = dict(body, kv_transfer_params={"kvbridge": {"transfer_id": tid, "receive": True,
                                                      "claims": body.get("n", 1)}})
    f_pre = _pool.submit(post, servers["prefill"].url, path, pre)
    status, reply = post(servers["decode"].url, path, dec)
    assert f_pre.result()[0] == 200
    return status, reply


def choices(reply: dict) -> list[tuple[int, str]]:
    out = []
    for c in reply["choices"]:
        out.append((c["index"], c["text"] if "text" in c else c["message"]["content"]))
    return sorted(out)


def counter(servers, name: str) -> int:
    return pool_status(servers["decode"].handshake).counters.get(name, 0)


def scattered(servers) -> int:
    return counter(servers, "transfers_scattered")


# below, at and above one 256-token chunk, and several chunks
MIXED = [random_token_prompt(n, seed=7000 + n) for n in (100, 256, 300, 600, 40)]


@pytest.mark.parametrize("prompt", [
    [random_words(120, seed=71), random_words(400, seed=72)],       # two string prompts
    MIXED,                                                           # five token-list prompts, mixed lengths
    [MIXED[0], MIXED[0]],                                            # the same prompt twice
], ids=["2-strings", "5-token-lists", "repeated"])
def test_list_prompts_each_get_their_own_kv(servers, prompt):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0}
    want = post(servers["agg"].url, "/v1/completions", body)[1]
    before, expired_before = scattered(servers), counter(servers, "transfers_expired")
    status, got = pd_fanout(servers, "/v1/completions", body)
    assert status == 200 and choices(got) == choices(want)
    assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
    distinct = len({tuple(p) if isinstance(p, list) else p for p in prompt})
    assert scattered(servers) - before >= distinct, "each distinct prompt's KV should arrive, not be recomputed"
    # a repeat of a prompt reads its one transfer, or (scheduled after the others read it) recomputes at once:
    # none waits out the load timeout for a push that will not come
    assert counter(servers, "transfers_expired") == expired_before


def test_n_2_with_a_seed_reads_one_transfer_twice(servers):
    body = {"model": "tiny", "prompt": random_words(300, seed=73), "max_tokens": 12, "n": 2, "seed": 5,
            "temperature": 0.9}
    want = post(servers["agg"].url, "/v1/completions", body)[1]
    before = scattered(servers)
    status, got = pd_fanout(servers, "/v1/completions", body)
    assert status == 200 and choices(got) == choices(want)
    assert scattered(servers) - before == 2, "both children should scatter the one transfer"


def test_chat_n_2_equals_aggregated(servers):
    body = {"model": "tiny", "messages": [{"role": "user", "content": random_words(200, seed=74)}],
            "max_tokens": 10, "n": 2, "seed": 11, "temperature": 0.8}
    want = post(servers["agg"].url, "/v1/chat/completions", body)[1]
    status, got = pd_fanout(servers, "/v1/chat/completions", body)
    assert status == 200 and choices(got) == choices(want)


@pytest.mark.parametrize("extra", [{"logprobs": 2}, {"stop": [" ka"]}, {"min_tokens": 6, "max_tokens": 8}],
                         ids=["logprobs", "stop", "min_tokens"])
def test_sampling_parameters_on_the_decode_leg_equal_aggregated(servers, extra):
    body = {"model": "tiny", "prompt": random_token_prompt(280, seed=75), "max_tokens": 12, "temperature": 0,
            **extra}
    want = post(servers["agg"].url, "/v1/completions", body)[1]
    status, got = pd_fanout(servers, "/v1/completions", body)
    assert status == 200 and choices(got) == choices(want)
    if "logprobs" in extra:
        assert got["choices"][0]["logprobs"]["tokens"] == want["choices"][0]["logprobs"]["tokens"]

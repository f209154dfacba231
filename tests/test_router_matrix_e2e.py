"""The OpenAI request matrix through the router, streamed and not, against aggregated vLLM.

Every request shape that vLLM fans out into several engine requests (list prompts, token-list prompts,
`n = 2`) or that changes what the decode leg samples (`logprobs`, `stop`, `min_tokens`) must give the
answer aggregated vLLM gives, choice by choice — and its KV must have arrived over PD, not been quietly
recomputed (counted by the decode node's scatters).
"""
from __future__ import annotations

import openai
import pytest

from launch.tiny_prompts import random_token_prompt, random_words
from tests.pd_client import log_lines, pool_status

pytestmark = pytest.mark.usefixtures("decode_pool_full_after")

MIXED = [random_token_prompt(n, seed=8100 + n) for n in (90, 256, 310, 520, 30)]
COMPLETIONS = {
    "2-strings": ({"prompt": [random_words(110, seed=81), random_words(380, seed=82)]}, 2),
    "5-token-lists": ({"prompt": MIXED}, 5),
    "n2-seed": ({"prompt": random_words(300, seed=83), "n": 2, "seed": 3, "temperature": 0.9}, 2),
    "logprobs": ({"prompt": random_token_prompt(270, seed=84), "logprobs": 2}, 1),
    "stop": ({"prompt": random_words(200, seed=85), "stop": [" ka"]}, 1),
    "min-tokens": ({"prompt": random_token_prompt(260, seed=86), "max_tokens": 8,
                    "extra_body": {"min_tokens": 6}}, 1),
}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def scattered(servers) -> int:
    return pool_status(servers["decode"].handshake).counters.get("transfers_scattered", 0)


def why_not_pd(servers, router) -> str:
    """What the router and the nodes logged last about node states and failed transfers."""
    return "\n".join(["router:", *log_lines(router, " is now "),
                      "prefill:", *log_lines(servers["prefill"], "-> FAILED", "not delivered"),
                      "decode:", *log_lines(servers["decode"], "-> FAILED", "-> EXPIRED", "recomput")])


def completion_choices(url: str, body: dict, stream: bool) -> dict[int, tuple]:
    """Choice index → (text, logprob tokens); a stream is reassembled per index as a client would."""
    args = {"model": "tiny", "max_tokens": 12, "temperature": 0, **body}
    if not stream:
        reply = client(url).completions.create(**args)
        return {c.index: (c.text, c.logprobs.tokens if c.logprobs else None) for c in reply.choices}
    out: dict[int, list] = {}
    for part in client(url).completions.create(stream=True, **args):
        for c in part.choices:
            text, tokens = out.setdefault(c.index, ["", []])
            out[c.index] = [text + c.text, tokens + (c.logprobs.tokens if c.logprobs else [])]
    return {i: (t, toks or None) for i, (t, toks) in out.items()}


def chat_choices(url: str, body: dict, stream: bool) -> dict[int, str]:
    args = {"model": "tiny", "max_tokens": 10, **body}
    if not stream:
        return {c.index: c.message.content for c in client(url).chat.completions.create(**args).choices}
    out: dict[int, str] = {}
    for part in client(url).chat.completions.create(stream=True, **args):
        for c in part.choices:
            out[c.index] = out.get(c.index, "") + (c.delta.content or "")
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", list(COMPLETIONS))
def test_completion_matrix_through_the_router_equals_aggregated(servers, router, case, stream):
    body, transfers = COMPLETIONS[case]
    want = completion_choices(servers["agg"].url, body, False)
    before = scattered(servers)
    got = completion_choices(router.url, body, stream)
    assert got == want
    assert scattered(servers) - before >= transfers, \
        f"every engine request's KV should arrive over PD\n{why_not_pd(servers, router)}"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_n_2_through_the_router_equals_aggregated(servers, router, stream):
    body = {"messages": [{"role": "user", "content": random_words(220, seed=87)}], "n": 2, "seed": 13,
            "temperature": 0.8}
    want = chat_choices(servers["agg"].url, body, False)
    before = scattered(servers)
    assert chat_choices(router.url, body, stream) == want
    assert scattered(servers) - before >= 2, why_not_pd(servers, router)

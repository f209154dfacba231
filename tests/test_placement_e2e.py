"""Conditional disaggregation in front of the shared real vLLM prefill and decode nodes (tests/conftest.py):
a short prompt is prefilled on the decode node itself, a long one on the prefill node with its KV moved, and
the next turn of that long prompt on the decode node that holds it; every answer equals aggregated vLLM's.

The router keeps its configured rates (`learn: false`): learned from this machine's timings, the next turn's choice
turned on how loaded the machine was when the long prompt's leg ran (after a leg about twice as slow as here, the 44
tokens the decode node lacks, computed there at 1.5 times the cost, were priced above a prefill leg's overhead).
tests/test_placement.py covers the learning."""
from __future__ import annotations

import pytest
import requests

from launch.local_servers import SERVED_MODEL, free_port, start_router
from launch.tiny_prompts import random_words
from router.config import RouterConfig

pytestmark = pytest.mark.usefixtures("decode_pool_full_after")
TINY_KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 32 * 4  # K and V x 2 layers x 2 KV heads x head size 32 x float32


@pytest.fixture(scope="module")
def auto_router(servers):
    prefill, decode = servers["prefill"], servers["decode"]
    r = start_router(RouterConfig(port=free_port(), model=SERVED_MODEL, health_interval_s=0.5, unhealthy_after=1,
                                  policy="prefix_aware", placement={"mode": "auto", "learn": False,
                                                                     "kv_bytes_per_token": TINY_KV_BYTES_PER_TOKEN},
                                  prefill=[{"name": prefill.name, "url": prefill.url}],
                                  decode=[{"name": decode.name, "url": decode.url, "kv_address": decode.handshake}]))
    yield r
    r.stop()


def answer(url: str, prompt: str) -> tuple[str, str]:
    r = requests.post(url + "/v1/completions", json={"model": SERVED_MODEL, "prompt": prompt, "max_tokens": 12,
                                                     "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], r.headers.get("x-kvbridge-request-id", "")


def placed(url: str, rid: str) -> dict:
    return requests.get(f"{url}/debug/requests/{rid}", timeout=5).json()["placement"][-1]


def test_short_local_long_remote_next_turn_local_all_equal_aggregated(servers, auto_router):
    agg, url = servers["agg"].url, auto_router.url
    short = random_words(8, seed=71)
    text, rid = answer(url, short)
    assert placed(url, rid)["reason"] == "short_prompt" and text == answer(agg, short)[0]
    long_prompt = random_words(600, seed=72)
    text, rid = answer(url, long_prompt)
    decision = placed(url, rid)
    assert decision["where"] == "remote" and decision["reason"] == "remote_cheaper", decision
    assert text == answer(agg, long_prompt)[0]
    turn = long_prompt + " " + random_words(4, seed=73)
    text, rid = answer(url, turn)
    assert placed(url, rid)["reason"] == "decode_holds_prefix" and text == answer(agg, turn)[0]

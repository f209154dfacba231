"""A prompt several times the decode's whole slot pool, through real vLLM: it streams through the window
(chunks scattered as they land) and the answer equals aggregated serving; slots and staging come back
full. The decode node here has one slot (256 tokens) and the prompt 8 chunks: the ratio of a 32k-token
prompt on 64 slots of 256 tokens, at a size two CPU cores serve in seconds."""
from __future__ import annotations

from launch.polling import wait_for
from launch.tiny_prompts import random_token_prompt
from tests.pd_client import (pd_request, pool_status, post, source_tokens, text_of, vllm_metric_sum,
                             wait_producer_idle)

SLOTS, CHUNK_TOKENS = 1, 256  # the one_slot_decode fixture's pool


def test_a_prompt_of_eight_pools_streams_through_one_slot_and_equals_aggregated(one_slot_decode):
    trio = one_slot_decode
    n = 8 * SLOTS * CHUNK_TOKENS - 100  # 8 chunks, the last one partly filled
    body = {"model": "tiny", "prompt": random_token_prompt(n, seed=8080), "max_tokens": 12, "temperature": 0}
    code, reply = post(trio["agg"].url, "/v1/completions", body)
    assert code == 200, reply
    before = pool_status(trio["decode"].handshake).counters
    before_src = source_tokens(trio["decode"].url)
    recv0 = vllm_metric_sum(trio["decode"].url, "vllm:kvbridge_recv_bytes_total")
    pre, dec = pd_request(trio, "/v1/completions", body)
    assert pre[0] == 200 and dec[0] == 200, (pre, dec)
    assert text_of(dec[1]) == text_of(reply)
    after = pool_status(trio["decode"].handshake).counters
    assert after["transfers_windowed"] - before.get("transfers_windowed", 0) == 1
    assert after["tokens_scattered"] - before.get("tokens_scattered", 0) == n  # every token came over, none recomputed
    assert source_tokens(trio["decode"].url)["external_kv_transfer"] - before_src.get("external_kv_transfer", 0) == n
    # vLLM's own transfer statistics count the streamed bytes (published with a later step's output)
    moved = after["bytes_received"] - before.get("bytes_received", 0)
    assert moved > 0
    wait_for(lambda: vllm_metric_sum(trio["decode"].url, "vllm:kvbridge_recv_bytes_total") - recv0 == moved, 20,
             0.2, "vLLM's kvbridge_recv_bytes to count the streamed transfer")
    wait_for(lambda: (st := pool_status(trio["decode"].handshake)).free == st.total, 10, 0.05, "decode pool full")
    wait_producer_idle(trio["prefill"])

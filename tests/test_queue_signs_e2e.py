"""A push request that waits in a busy prefill's queue longer than the decode's load timeout is not
recomputed: the prefill announces it (PENDING) until it is scheduled, and each announcement restarts the
decode request's timer. Its KV then arrives and is used (every prompt token scattered, none expired)."""
from __future__ import annotations

import concurrent.futures as cf
import time

from launch.polling import wait_for
from launch.tiny_prompts import random_token_prompt
from tests.pd_client import pd_request, pool_status, post, text_of, wait_producer_idle

FLOOD = 32  # plain prompts of 1900 tokens ahead of ours: the prefill computes at most 2048 tokens a step


def test_a_request_queued_behind_a_flood_keeps_its_decode_waiting_and_is_not_recomputed(one_slot_decode):
    trio = one_slot_decode
    n = 600
    body = {"model": "tiny", "prompt": random_token_prompt(n, seed=9090), "max_tokens": 8, "temperature": 0}
    code, reply = post(trio["agg"].url, "/v1/completions", body)
    assert code == 200, reply
    before = pool_status(trio["decode"].handshake).counters
    flood = [{"model": "tiny", "prompt": random_token_prompt(1900, seed=9100 + i), "max_tokens": 1}
             for i in range(FLOOD)]
    with cf.ThreadPoolExecutor(FLOOD) as ex:
        floods = [ex.submit(post, trio["prefill"].url, "/v1/completions", b) for b in flood]
        time.sleep(0.3)  # the flood is in the prefill's queue before our request
        t0 = time.monotonic()
        pre, dec = pd_request(trio, "/v1/completions", body)
        took = time.monotonic() - t0
        assert all(f.result()[0] == 200 for f in floods)
    assert pre[0] == 200 and dec[0] == 200, (pre, dec)
    assert text_of(dec[1]) == text_of(reply)
    after = pool_status(trio["decode"].handshake).counters
    print(f"request queued behind {FLOOD} x 1900 tokens: answered after {took:.1f}s (decode load timeout 3 s, "
          f"{after.get('pending_announcements', 0) - before.get('pending_announcements', 0)} announcements; "
          f"machine shared with other work)")
    assert after.get("pending_announcements", 0) > before.get("pending_announcements", 0)
    assert after.get("transfers_expired", 0) == before.get("transfers_expired", 0)
    assert after["tokens_scattered"] - before.get("tokens_scattered", 0) == n  # its KV was used, not recomputed
    wait_for(lambda: (st := pool_status(trio["decode"].handshake)).free == st.total, 10, 0.05, "decode pool full")
    wait_producer_idle(trio["prefill"])

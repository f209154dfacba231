"""One long prompt through PD on a decode whose whole slot pool is a fraction of it, against aggregated.

Starts an aggregated vLLM, a kvbridge prefill and a kvbridge decode with `--slots` slots of 256 tokens
(the tiny model, `--max-model-len` raised past the model's 4096 positions: random weights, so only the
equality of the tokens matters, not their sense). Sends the prompt to each, checks that the PD answer
equals the aggregated one and that every prompt token was scattered (none recomputed), and prints the
times of one run and the decode's transfer counters.

    python bench/long_prompt.py [--tokens 32000] [--slots 64]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import time
import uuid

import requests

from launch.local_servers import MODEL_DIR, start_vllm
from launch.tiny_model import make_tiny_model
from launch.tiny_prompts import random_token_prompt
from router.leg_bodies import decode_body, prefill_body
from transfer.control_request import fetch_pool_status


def post(url: str, body: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = requests.post(url + "/v1/completions", json=body, timeout=1800)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["choices"][0]["text"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32000)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=33024)
    args = ap.parse_args()
    make_tiny_model(MODEL_DIR)
    env = {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
    servers = {"agg": start_vllm("long-agg", max_model_len=args.max_model_len, env=env),
               "prefill": start_vllm("long-prefill", "prefill", {"checksum": True}, max_model_len=args.max_model_len,
                                     env=env, vllm_args=("--no-enable-prefix-caching",)),
               "decode": start_vllm("long-decode", "decode", {"checksum": True, "num_slots": args.slots},
                                    max_model_len=args.max_model_len, env=env)}
    try:
        for s in servers.values():
            s.wait_ready(timeout=600)
        body = {"model": "tiny", "prompt": random_token_prompt(args.tokens, seed=32), "max_tokens": 8,
                "temperature": 0}
        agg_s, want = post(servers["agg"].url, body)
        tid = uuid.uuid4().hex
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(2) as ex:  # both legs at once, as the router sends them
            dec = ex.submit(post, servers["decode"].url, decode_body(body, tid))
            pre = ex.submit(post, servers["prefill"].url, prefill_body(body, tid, servers["decode"].handshake))
            pre_s, _ = pre.result()
            _, got = dec.result()
        pd_s = time.perf_counter() - t0
        st = fetch_pool_status(servers["decode"].handshake)
        c = st.counters
        print(f"prompt {args.tokens} tokens = {-(-args.tokens // 256)} chunks of 256; decode pool {args.slots} slots")
        print(f"aggregated {agg_s:.1f}s; PD {pd_s:.1f}s (its prefill leg {pre_s:.1f}s) "
              f"(one run, 2-core machine shared with other engineers' work)")
        print(f"PD answer equals aggregated: {got == want}; tokens scattered {c.get('tokens_scattered', 0)}; "
              f"windowed transfers {c.get('transfers_windowed', 0)}; expired {c.get('transfers_expired', 0)}; "
              f"pool after: {st.free}/{st.total} free")
        if got != want or c.get("tokens_scattered", 0) != args.tokens:
            raise SystemExit("FAILED: the PD answer differs or the prompt was not fully transferred")
    finally:
        for s in servers.values():
            s.stop()


if __name__ == "__main__":
    main()

"""Where a PD decode's extra time per output token goes: the gap before each token, by the token's index.

bench/pd_interleaved.py measured kvbridge's decode node 4-7 % slower per token than aggregated vLLM in one
24-prompt run, and its per-step hooks cost microseconds; this says whether the excess sits in the first steps after the KV arrived (the
scatter's freshly touched pages, the receive's bookkeeping, the slot's release) or spreads over the whole answer
(the connector's threads, the process itself). Four systems, each prompt to all four back to back in a rotating
order, every decode on core 1, every prefill node confined to core 0:

- `pd`: kvbridge's prefill node pushes the KV, `--decode-after` seconds of quiet, then the decode node decodes;
- `decode-node-local`: the same decode node computes a prompt of the same length itself, then after the same pause
  decodes it (a prefix-cache hit that recomputes its last partial block): the same process and connector, no
  transfer;
- `aggregated`: vLLM without a connector, the same sequence (bench/pd_interleaved.py's `paused_aggregated`);
- `nixl-best`: vLLM's NixlConnector in its best configuration here (bench/pd_bench.py's BEST), its prefill
  node confined to core 0 and its decode on core 1 like ours: the prefill leg, the same pause, then the decode
  leg, which pulls the KV before its first token. `pd` and `nixl-best` get the same prompt, and the bench counts
  the prompts on which their answers were equal (temperature 0: two PD paths that moved the same prompt's KV).

    python -m bench.decode_gaps [--lengths 1000] [--repeats 12] [--max-tokens 96] [--decode-after 1.5] [--no-nixl]

Prints per prompt length, per range of token indices (a range past the answers' length is left out: every answer
has `--max-tokens` tokens, EOS ignored), each system's median gap in ms and each prompt's own ratio pd / the others,
median [95 % interval], then the same over the whole answer.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid

import requests

from bench.confine import confine
from bench.median_ci import median_ci
from bench.pd_bench import BEST, MODEL, nixl_prefill, start
from bench.pd_interleaved import paused_aggregated
from bench.streamed import Streamed, gaps_by_index, in_range, stream_ttft
from launch.local_servers import free_port, start_vllm
from launch.servers import VllmServer
from launch.tiny_model import make_tiny_model
from router.leg_bodies import decode_body, prefill_body

RANGES = [(1, 1), (2, 2), (3, 3), (4, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 10_000)]


def pd_decode(p: VllmServer, d: VllmServer, body: dict, pause: float) -> Streamed:
    """The prefill node pushes `body`'s KV to `d`; `pause` seconds later `d` decodes it."""
    tid = uuid.uuid4().hex
    requests.post(p.url + "/v1/completions", json=prefill_body(body, tid, d.handshake), timeout=300).raise_for_status()
    time.sleep(pause)
    return stream_ttft(d.url, decode_body(body, tid))


def nixl_decode(p: VllmServer, d: VllmServer, body: dict, pause: float) -> Streamed:
    """NixlConnector's prefill leg on `p`; `pause` seconds later `d` pulls the KV and decodes."""
    params = nixl_prefill(p, body)
    time.sleep(pause)
    return stream_ttft(d.url, dict(body, kv_transfer_params=params))


def report(length: int, per_system: dict[str, list[dict[int, float]]]) -> None:
    names = list(per_system)
    print(f"\n{length}-token prompts: gap before each output token, ms: median over prompts of each prompt's mean "
          "gap in the range; then pd / each other system, prompt by prompt, median [95 % interval]")
    print(f"{'tokens':>10} " + " ".join(f"{n:>18}" for n in names) + "   "
          + "   ".join(f"{'pd / ' + n:26}" for n in names[1:]))
    for lo, hi in [*RANGES, (1, 10_000)]:
        means = {n: [in_range(g, lo, hi) for g in per_system[n]] for n in names}
        if any(m is None for ms in means.values() for m in ms):
            continue
        meds = " ".join(f"{statistics.median(means[n]) * 1000:18.2f}" for n in names)
        ratios = "   ".join(f"{str(median_ci([a / b for a, b in zip(means['pd'], means[n])])):26}" for n in names[1:])
        label = "all" if (lo, hi) == (1, 10_000) else f"{lo}-{hi}" if hi < 10_000 else f"{lo}+"
        print(f"{label:>10} {meds}   {ratios}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000])
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--decode-after", type=float, default=1.5, help="seconds of quiet before each decode")
    ap.add_argument("--settle", type=float, default=1.5, help="seconds between requests")
    ap.add_argument("--no-nixl", action="store_true", help="leave NixlConnector-best out (two servers fewer)")
    args = ap.parse_args()
    make_tiny_model(MODEL, "bench")
    rng, own = random.Random(1), random.Random(2)
    servers = {"agg": start("gaps-agg", env={"VLLM_CPU_OMP_THREADS_BIND": "1"}),
               "kp": start_vllm("bench-gaps-kvb-prefill", "prefill", {}, model=MODEL, max_model_len=4096),
               "kd": start_vllm("bench-gaps-kvb-decode", "decode", {}, model=MODEL, max_model_len=4096)}
    if not args.no_nixl:
        servers.update({f"n{role[0]}": start(f"gaps-best-{role}", kv_config=BEST, env={
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()), "VLLM_CPU_OMP_THREADS_BIND": core})
            for role, core in (("prefill", "0"), ("decode", "1"))})
    s = servers
    systems = {"pd": lambda b: pd_decode(s["kp"], s["kd"], b, args.decode_after),
               "decode-node-local": lambda b: paused_aggregated(s["kd"].url, b, args.decode_after, own),
               "aggregated": lambda b: paused_aggregated(s["agg"].url, b, args.decode_after, own)}
    if not args.no_nixl:
        systems["nixl-best"] = lambda b: nixl_decode(s["np"], s["nd"], b, args.decode_after)
    names = list(systems)
    by_length: dict[int, dict[str, list[dict[int, float]]]] = {n: {name: [] for name in names} for n in args.lengths}
    same = {n: 0 for n in args.lengths}  # prompts whose pd and nixl-best answers were equal
    try:
        for srv in servers.values():
            srv.wait_ready(900)
        for key, what in (("kp", "kvbridge's"), ("np", "NixlConnector-best's")):
            if key in s:
                print(f"confined to core 0: {confine(s[key], {0})} threads of {what} prefill node", flush=True)
        warm = {"model": "tiny", "prompt": [rng.randrange(10, 1000) for _ in range(64)], "max_tokens": 2}
        for once in systems.values():
            once(warm)
        for n, per_system in by_length.items():
            for turn in range(args.repeats):
                body = {"model": "tiny", "prompt": [rng.randrange(10, 1000) for _ in range(n)],
                        "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
                texts = {}
                for name in names[turn % len(names):] + names[:turn % len(names)]:
                    time.sleep(args.settle)
                    got = systems[name](body)
                    texts[name] = got.text
                    per_system[name].append(gaps_by_index(got))
                same[n] += texts.get("nixl-best", texts["pd"]) == texts["pd"]
                ms = {k: round((in_range(g[-1], 1, 10_000) or float("nan")) * 1000, 2) for k, g in per_system.items()}
                print(f"  {n} tokens, prompt {turn + 1}: ms per token {ms}", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    for length, per_system in by_length.items():
        report(length, per_system)
        if not args.no_nixl:
            print(f"pd's answer equal to nixl-best's (same prompt, temperature 0): {same[length]}/{args.repeats}")


if __name__ == "__main__":
    main()

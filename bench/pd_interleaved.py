"""PD TTFT overhead of kvbridge and of NixlConnector at its best, measured back to back on the same prompts.

bench/pd_bench.py runs each system in its own phase, minutes apart; on a shared 2-core box the load drifts
between phases by more than the overheads it compares (one run measured NixlConnector-best 143 ms *faster*
than aggregated at 2000 tokens). Here every server is up at once — aggregated vLLM (core 0), kvbridge prefill
(core 0) + decode (core 1), NixlConnector-best prefill (core 0) + decode (core 1), pd/nixl_best.py — and each
prompt goes to the three systems one after the other, in an order that rotates, so each overhead is a
difference taken within seconds: system TTFT minus aggregated TTFT for the same prompt. Requests run one at a
time, `--settle` seconds apart (an idle server costs the others little: kvbridge's and NixlConnector-best's idle
nodes burn about 0.02 of a core, but a vLLM worker busy-polls for 1 s after its last step, on its node's core,
and without the pause whoever follows the aggregated server, which decodes on core 0, paid for it). kvbridge's
legs are sent as its router sends them (`--kvbridge-dispatch`, bench/core_share.py says why). Stock NixlConnector is left out: its progress threads spin a core per node, which would slow the
others. Prints per length the median overhead of each system, the ratio kvbridge / NixlConnector-best of
those medians, whether every answer equalled aggregated's, and each system's time per output token. Each
overhead is also split in two: the prefill leg's time until it answered minus aggregated's TTFT (the prompt
computed by another server on another core: where most of the spread between prompts comes from), and the
decode's first token after the prefill answered (the part PD itself adds, and the one the two systems do
differently: kvbridge pushed the KV during the prefill, NixlConnector pulls it now).

    python -m bench.pd_interleaved [--lengths 128 1000 2000] [--repeats 5] [--kvbridge-dispatch with_prefill]
        [--settle 1.5] [--prefill-connector JSON] [--agg-core 1] [--decode-after 1.5]

`--decode-after S` sleeps S seconds between each PD request's prefill answer and its decode leg, so the
decode's time per output token is timed with its prefill node quiet (that node's worker busy-polls its core
for 1 s after its last step, and on a 2-core box the decode's unpinned threads then share the other core);
the TTFT table is then left out.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from bench.pd_bench import MODEL, ExposedTimes, kvbridge_once, nixl_once, parse_with_decode_after, start, stream_ttft
from launch.local_servers import free_port, start_vllm
from launch.servers import VllmServer
from launch.tiny_model import make_tiny_model

BEST = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu",
        "kv_load_failure_policy": "recompute", "kv_connector_module_path": "pd.nixl_best",
        "kv_connector_extra_config": {"num_threads": 0}}


def start_side_by_side(tag: str, prefill_connector: dict, metrics_port: int, agg_core: str = "0"
                       ) -> dict[str, VllmServer]:
    """Aggregated vLLM (`agg_core`), kvbridge prefill (core 0) + decode (core 1, its worker's metrics on
    `metrics_port`) and NixlConnector-best prefill (core 0) + decode (core 1), all started, none waited for."""
    def best(role: str, core: str) -> VllmServer:
        return start(f"{tag}-best-{role}", kv_config=BEST, env={"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
                                                                 "VLLM_CPU_OMP_THREADS_BIND": core})
    return {"agg": start(f"{tag}-agg", env={"VLLM_CPU_OMP_THREADS_BIND": agg_core}),
            "kp": start_vllm(f"bench-{tag}-kvb-prefill", "prefill", prefill_connector, model=MODEL, max_model_len=4096),
            "kd": start_vllm(f"bench-{tag}-kvb-decode", "decode", {"metrics_port": metrics_port}, model=MODEL,
                             max_model_len=4096),
            "np": best("prefill", "0"), "nd": best("decode", "1")}


def print_ttft(rows: list, exposed: ExposedTimes, repeats: int) -> None:
    print(f"\nTTFT over aggregated, same prompts back to back, median of {repeats} per length")
    print("prompt  kvbridge +ms  NixlConnector-best +ms  kvbridge / best  answers equal (kvbridge, best)  "
          "kvbridge exposed transfer ms")
    for n, k, b, eq, *_ in rows:
        ex = statistics.median(exposed.by_length[n]) if exposed.by_length.get(n) else float("nan")
        print(f"{n:6} {k:13.1f} {b:23.1f} {k / b if b else float('nan'):16.2f}  "
              f"{eq['kvbridge']}/{repeats}, {eq['nixl-best']}/{repeats}{'':21}{ex:.1f}")
    print("\nthe same overheads in two parts (medians): the prefill leg's time until it answered, minus aggregated's "
          "TTFT (the prompt's compute on another server: most of the spread between prompts), and the decode's first "
          "token after the prefill answered (what PD adds: the KV's move, the decode's scheduling, its first step)")
    print("prompt  prefill leg - aggregated ms (kvbridge / best)  first token after the prefill answered ms "
          "(kvbridge / best, ratio)")
    for n, *_, split in rows:
        (kp, ka), (bp, ba) = split["kvbridge"], split["nixl-best"]
        print(f"{n:6} {kp:15.1f} / {bp:7.1f}{'':22}{ka:15.1f} / {ba:7.1f}, {ka / ba if ba else float('nan'):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 1000, 2000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kvbridge-dispatch", choices=["after_prefill", "with_prefill"], default="after_prefill",
                    help="when kvbridge's decode leg is sent (the router's decode_dispatch; its auto is "
                    "after_prefill for requests one at a time)")
    ap.add_argument("--settle", type=float, default=1.5, help="seconds between requests: an idle vLLM worker "
                    "busy-polls for 1 s after its last step, on its node's core, and would slow whoever comes next")
    ap.add_argument("--prefill-connector", type=json.loads, default={},
                    help='extra kvbridge settings for the prefill node, e.g. \'{"gil_switch_interval_ms": 5}\'')
    ap.add_argument("--agg-core", default="0", help="the aggregated server's core: 0, the prefill nodes' (its TTFT "
                    "computes where theirs do), or 1, the decode nodes' (its time per output token is measured "
                    "where theirs is)")
    args = parse_with_decode_after(ap)
    make_tiny_model(MODEL, "bench")
    rng = random.Random(1)
    metrics_port = free_port()
    servers = start_side_by_side("il", args.prefill_connector, metrics_port, args.agg_core)
    exposed = ExposedTimes(f"http://127.0.0.1:{metrics_port}/metrics")
    s = servers
    systems = {"aggregated": lambda b: stream_ttft(s["agg"].url, b),
               "kvbridge": lambda b: kvbridge_once(s["kp"], s["kd"], b, exposed, args.kvbridge_dispatch,
                                                       args.decode_after),
               "nixl-best": lambda b: nixl_once(s["np"], s["nd"], b, args.decode_after)}
    names = list(systems)
    rows = []
    try:
        for srv in servers.values():
            srv.wait_ready(900)
        warm = {"model": "tiny", "prompt": [rng.randrange(10, 1000) for _ in range(64)], "max_tokens": 2}
        for once in systems.values():
            once(warm)
        turn = 0
        for n in args.lengths:
            over: dict[str, list[float]] = {"kvbridge": [], "nixl-best": []}
            equal = {"kvbridge": 0, "nixl-best": 0}
            tpot: dict[str, list[float]] = {name: [] for name in names}
            parts: dict[str, list[tuple[float, float]]] = {name: [] for name in over}  # (prefill - agg, after) ms
            for _ in range(args.repeats):
                body = {"model": "tiny", "prompt": [rng.randrange(10, 1000) for _ in range(n)],
                        "max_tokens": args.max_tokens, "temperature": 0}
                order = names[turn % 3:] + names[:turn % 3]
                turn += 1
                got = {}
                for name in order:
                    time.sleep(args.settle)
                    got[name] = systems[name](body)
                for name in names:
                    tpot[name].append(got[name][2] * 1000)
                for name in over:
                    over[name].append((got[name].ttft - got["aggregated"][0]) * 1000)
                    parts[name].append(((got[name].prefill_s - got["aggregated"][0]) * 1000,
                                        (got[name].ttft - got[name].prefill_s) * 1000))
                    equal[name] += got[name][1] == got["aggregated"][1]
            k, b = statistics.median(over["kvbridge"]), statistics.median(over["nixl-best"])
            paired = {name: statistics.median(x / a for x, a in zip(tpot[name], tpot["aggregated"])) for name in over}
            split = {name: tuple(statistics.median(x) for x in zip(*v)) for name, v in parts.items()}
            rows.append((n, k, b, equal, {name: statistics.median(v) for name, v in tpot.items()}, paired, split))
            print(f"  {n} tokens: TTFT overhead{' (not comparable: --decode-after)' if args.decode_after else ''} "
                  f"kvbridge {k:.1f} ms, NixlConnector-best {b:.1f} ms "
                  f"(per prompt: {[round(x) for x in over['kvbridge']]} / {[round(x) for x in over['nixl-best']]}); "
                  f"per output token ms {({name: [round(x, 1) for x in v] for name, v in tpot.items()})}", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    if not args.decode_after:
        print_ttft(rows, exposed, args.repeats)
    print(f"\ntime per output token after the first, ms (median; aggregated decodes on core {args.agg_core}, both "
          "decode nodes on core 1; 'paired': the median of each prompt's own ratio to aggregated)\n"
          "prompt  aggregated  kvbridge (/ agg, paired)  NixlConnector-best (/ agg, paired)  answers equal")
    for n, _, _, eq, t, p, _ in rows:
        a = t["aggregated"]
        print(f"{n:6} {a:11.2f} {t['kvbridge']:9.2f} ({t['kvbridge'] / a:4.2f}, {p['kvbridge']:4.2f}) "
              f"{t['nixl-best']:13.2f} ({t['nixl-best'] / a:4.2f}, {p['nixl-best']:4.2f})      "
              f"{eq['kvbridge']}/{args.repeats}, {eq['nixl-best']}/{args.repeats}")


if __name__ == "__main__":
    main()

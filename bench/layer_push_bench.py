"""What pushing a chunk a group of layers at a time buys: two kvbridge prefill nodes, one run, the same prompts.

One prefill node hands chunks over whole after the forward (`layer_groups` 1), the other a group of layers at a
time during it (`--groups`, default 4); both are on core 0 and push to one decode node on core 1; aggregated vLLM
(core 0) answers each prompt once for the reference. Each prompt goes to both prefill nodes back to back, in an
order that alternates, `--settle` s apart, with the legs sent as the router sends them for requests one at a time
(the decode leg once the prefill leg answered). Per length it prints the medians of TTFT, of the decode leg's
TTFT (how long the decode waited for its KV and stepped once) and of the decode's exposed transfer time, for each
node, their ratios, and whether every answer equalled aggregated's.

The exposed time starts when the prompt's last chunk was handed to the push thread: after the forward for whole
chunks, at the last attention layer for the layer-wise node, whose forward still runs the LM head after that. So
the layer-wise figure is counted from earlier and, if anything, overstated.

    python -m bench.layer_push_bench [--lengths 1000 2000] [--repeats 6] [--groups 4] [--settle 1.5]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid

import requests

from bench.pd_bench import MODEL, ExposedTimes, start
from bench.streamed import stream_ttft
from launch.local_servers import free_port, start_vllm
from launch.servers import VllmServer
from launch.tiny_model import make_tiny_model
from router.leg_bodies import decode_body, prefill_body


def pd_once(p: VllmServer, d: VllmServer, body: dict, exposed: ExposedTimes) -> tuple[float, float, str, float]:
    """(TTFT from the prefill leg's start, the decode leg's TTFT, the text, exposed ms) for one request."""
    before = exposed.read()
    tid = uuid.uuid4().hex
    pre = prefill_body(body, tid, d.handshake)
    t0 = time.perf_counter()
    requests.post(p.url + "/v1/completions", json=pre, timeout=300).raise_for_status()
    leg = time.perf_counter() - t0
    ttft, text, _ = stream_ttft(d.url, decode_body(body, tid))
    s0, c0 = before
    s1, c1 = exposed.read()
    return (leg + ttft) * 1000, ttft * 1000, text, (s1 - s0) * 1000 if c1 == c0 + 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--groups", type=int, default=4, help="layer groups of the layer-wise node")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--settle", type=float, default=1.5)
    args = ap.parse_args()
    make_tiny_model(MODEL, "bench")
    rng = random.Random(7)
    metrics_port = free_port()
    nodes = {"whole": {"layer_groups": 1}, "layers": {"layer_groups": args.groups}}
    servers = {"agg": start("lp-agg", env={"VLLM_CPU_OMP_THREADS_BIND": "0"}),
               "decode": start_vllm("bench-lp-decode", "decode", {"metrics_port": metrics_port}, model=MODEL,
                                    max_model_len=4096),
               **{name: start_vllm(f"bench-lp-{name}", "prefill", extra, model=MODEL, max_model_len=4096)
                  for name, extra in nodes.items()}}
    exposed = ExposedTimes(f"http://127.0.0.1:{metrics_port}/metrics")
    rows = []
    try:
        for srv in servers.values():
            srv.wait_ready(900)
        for name in nodes:
            pd_once(servers[name], servers["decode"], {"model": "tiny", "prompt": [5] * 64, "max_tokens": 2}, exposed)
        turn = 0
        for n in args.lengths:
            got: dict[str, list[tuple]] = {name: [] for name in nodes}
            equal = dict.fromkeys(nodes, 0)
            for _ in range(args.repeats):
                body = {"model": "tiny", "prompt": [rng.randrange(10, 1000) for _ in range(n)],
                        "max_tokens": args.max_tokens, "temperature": 0}
                want = stream_ttft(servers["agg"].url, body)[1]
                order = list(nodes)[turn % 2:] + list(nodes)[:turn % 2]
                turn += 1
                for name in order:
                    time.sleep(args.settle)
                    r = pd_once(servers[name], servers["decode"], body, exposed)
                    got[name].append(r)
                    equal[name] += r[2] == want
                    print(f"  {n} tokens, {name}: TTFT {r[0]:.1f} ms, decode leg {r[1]:.1f} ms, exposed {r[3]:.1f} ms",
                          flush=True)
            med = {name: [statistics.median(r[i] for r in got[name]) for i in (0, 1, 3)] for name in nodes}
            rows.append((n, med, equal))
    finally:
        for srv in servers.values():
            srv.stop()
    print(f"\nmedians of {args.repeats} prompts per length; 'layers' hands chunks over in {args.groups} groups of "
          "layers, 'whole' after the forward")
    print("prompt  TTFT whole / layers ms (ratio)   decode leg whole / layers ms (ratio)   "
          "exposed whole / layers ms (ratio)   answers equal (whole, layers)")
    for n, med, eq in rows:
        (tw, dw, ew), (tl, dl, el) = med["whole"], med["layers"]
        print(f"{n:6}  {tw:8.1f} / {tl:8.1f} ({tl / tw:4.2f})     {dw:8.1f} / {dl:8.1f} ({dl / dw:4.2f})"
              f"         {ew:7.1f} / {el:7.1f} ({el / ew:4.2f})      {eq['whole']}/{args.repeats}, "
              f"{eq['layers']}/{args.repeats}")


if __name__ == "__main__":
    main()

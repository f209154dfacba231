"""What the connector's hooks cost a decode loop that receives nothing: kvbridge against NixlConnector-best.

vLLM calls a loaded connector on every engine step, so on a decode node its per-step hooks are paid on every
token of every request, transfer or not. Three decode nodes run on core 1 — kvbridge's (`kv_consumer`),
NixlConnector-best's (pd/nixl_best.py) and one with a connector that does nothing (pd/empty_connector.py: the
floor of the timed hooks, the wrapper and vLLM's default hook bodies; the whole cost of having a connector at all
is its per-token ratio to aggregated), all three timed by the same wrapper (pd/hook_timer.py) — and
serve the same `--streams` plain requests (no transfer ever) in alternating rounds, one node at a time.
Aggregated vLLM (no connector) on core 1 serves the same rounds. Each connector node's worker and scheduler log
their hooks' mean cost per engine step every 10 s; the bench prints, per node and process, the median of those
lines and per hook, the ratio kvbridge / NixlConnector-best of the medians and each one's cost above the floor,
and each node's time per output token (median gap between streamed tokens once every stream runs) with its ratio
to aggregated's, and that ratio taken round by round (the nodes of one round run within a minute of each other, so
load that drifts between rounds cancels), with its median and quartiles.

    python -m bench.hook_cost [--streams 8] [--tokens 128] [--rounds 4]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics

from bench.decode_under_arrivals import Target, one_round
from bench.pd_bench import BEST, MODEL, hook_lines, start
from launch.local_servers import free_port, start_vllm
from launch.tiny_model import make_tiny_model

EMPTY = {"kv_connector": "EmptyConnector", "kv_role": "kv_both", "kv_connector_module_path": "pd.empty_connector"}
PEERS = ("kvbridge", "nixl-best", "empty")  # the connector nodes; "aggregated" has none


def median_hooks(lines: list[tuple[float, dict[str, float]]]) -> tuple[float, dict[str, float]]:
    """(median us per step, per hook median): a line whose window held an idle stretch weighs as much as any."""
    hooks = sorted({h for _, per in lines for h in per})
    return (statistics.median(t for t, _ in lines),
            {h: statistics.median(per.get(h, 0.0) for _, per in lines) for h in hooks})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128, help="tokens each request decodes")
    ap.add_argument("--stream-prompt", type=int, default=256, help="prompt tokens of each request")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per node")
    args = ap.parse_args()
    args.every_s = 1.0  # one_round waits this long before it looks at arrivals; there are none here
    make_tiny_model(MODEL, "bench")
    nodes = {"aggregated": start("hooks-agg", env={"VLLM_CPU_OMP_THREADS_BIND": "1"}),
             "kvbridge": start_vllm("bench-hooks-kvb-decode", "decode", {"metrics_port": free_port()}, model=MODEL,
                                    max_model_len=4096),
             "nixl-best": start("hooks-best-decode", kv_config=BEST, env={
                 "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()), "VLLM_CPU_OMP_THREADS_BIND": "1"}),
             "empty": start("hooks-empty-decode", kv_config=EMPTY, env={"VLLM_CPU_OMP_THREADS_BIND": "1"})}
    gaps: dict[str, list[float]] = {name: [] for name in nodes}
    try:
        for node in nodes.values():
            node.wait_ready(900)
        for node in nodes.values():  # warm-up, not counted
            asyncio.run(one_round(Target(node), args, random.Random(99), arrivals=None))
        offsets = {name: node.log_path.stat().st_size for name, node in nodes.items()}
        for r in range(args.rounds):
            order = list(nodes.items())
            for name, node in order[r % len(order):] + order[:r % len(order)]:  # each node first in turn
                round_gaps = asyncio.run(one_round(Target(node), args, random.Random(r), arrivals=None))
                gaps[name].append(statistics.median(round_gaps) * 1000)
                print(f"  round {r} {name:9}: per token {gaps[name][-1]:.2f} ms", flush=True)
        lines = {name: hook_lines(node.log_path, offsets[name]) for name, node in nodes.items()}
    finally:
        for node in nodes.values():
            node.stop()
    print(f"\n{args.streams} plain requests x {args.tokens} tokens per round, {args.rounds} rounds per node; "
          "connector hooks in us per engine step (median of each process's 10 s lines)")
    for kind in ("Worker", "EngineCore"):
        got = {name: median_hooks(lines[name][kind]) for name in PEERS if lines[name].get(kind)}
        for name, (total, per) in got.items():
            print(f"  {kind:10} {name:9}: {total:6.1f} us/step ({len(lines[name][kind])} lines): "
                  + ", ".join(f"{h} {us:.1f}" for h, us in per.items()))
        if "kvbridge" in got and "nixl-best" in got:
            print(f"  {kind:10} kvbridge / nixl-best: {got['kvbridge'][0] / got['nixl-best'][0]:.2f}")
        if "empty" in got:
            floor = got["empty"][0]
            print(f"  {kind:10} above the empty connector's {floor:.1f} us/step: " + ", ".join(
                f"{name} {got[name][0] - floor:.1f}" for name in ("kvbridge", "nixl-best") if name in got))
    tpot = {name: statistics.median(g) for name, g in gaps.items()}
    print("time per output token, median of rounds: " + ", ".join(
        f"{n} {ms:.2f} ms ({ms / tpot['aggregated']:.3f} x aggregated)" for n, ms in tpot.items()))
    for name in PEERS:  # each round's nodes ran within a minute of each other
        paired = sorted(a / b for a, b in zip(gaps[name], gaps["aggregated"]))
        q1, q3 = (statistics.quantiles(paired, n=4)[i] for i in (0, 2)) if len(paired) > 1 else (paired[0],) * 2
        print(f"  {name} / aggregated, paired by round: median {statistics.median(paired):.3f}, "
              f"quartiles {q1:.3f}-{q3:.3f}, all {[round(x, 3) for x in paired]}")


if __name__ == "__main__":
    main()

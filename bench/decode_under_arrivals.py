"""Per-token time of running decodes while new requests keep arriving: kvbridge's decode node against aggregated vLLM.

`--streams` requests (default 8) decode `--tokens` tokens each, streamed; while they run, a new request with a
`--arrival-tokens`-token prompt arrives every `--every-s` seconds. On kvbridge every request is a PD request
(prefill node on core 0, decode node on core 1): an arrival's KV is pushed into the decode node while the
streams decode there. On aggregated vLLM (on core 1 too) the same arrivals are prefilled by the node that decodes.
Each configuration also runs without arrivals, and kvbridge's decode node once more serving the same streams as
plain requests (prefilled by itself, no transfer ever), and once with the arrivals sent to its prefill node alone
("prefill busy": the same prefills, nothing pushed). The table shows what the connector costs a decode loop that
never receives, one with no transfer in flight, one whose machine is busy with prefills it does not receive, and
one receiving arrivals: on a shared box the last two differ by what receiving KV costs the running requests, and
that ratio is printed last. Per-token time is the gap between consecutive streamed tokens of the running
requests once all of them have their first token, median and p90; each of `--repeats` rounds runs every load
once, and the median over rounds is printed with the paired ratio (the median of each round's kvbridge /
aggregated).
For each kvbridge load the decode worker's connector hooks are timed per engine step (its Prometheus counters,
read before and after: pd/hook_timer.py), per hook.

    python -m bench.decode_under_arrivals [--streams 8] [--tokens 128] [--every-s 1.5] [--repeats 3]
                                          [--decode-connector '{"gil_switch_interval_ms": 5}']

The arrival rate must be one the aggregated node can prefill besides decoding, or its queue only grows.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import time
import uuid

import aiohttp
import requests

from bench.pd_bench import MODEL, start
from launch.local_servers import free_port, start_vllm
from launch.servers import VllmServer
from launch.tiny_model import make_tiny_model
from router.leg_bodies import decode_body, prefill_body


async def stream_stamps(s: aiohttp.ClientSession, url: str, body: dict) -> list[float]:
    """When each streamed token of one request arrived."""
    stamps = []
    async with s.post(url + "/v1/completions", json=dict(body, stream=True)) as r:
        r.raise_for_status()
        async for line in r.content:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                if json.loads(line[6:])["choices"][0]["text"] is not None:
                    stamps.append(time.perf_counter())
    return stamps


class Target:
    """Where a request goes: one aggregated server, or kvbridge's prefill + decode pair (both legs at once)."""

    def __init__(self, decode: VllmServer, prefill: VllmServer | None = None) -> None:
        self.decode, self.prefill = decode, prefill
        self.sent = 0  # requests run so far

    async def run(self, s: aiohttp.ClientSession, body: dict) -> list[float]:
        self.sent += 1
        if self.prefill is None:
            return await stream_stamps(s, self.decode.url, body)
        tid = uuid.uuid4().hex
        pre = prefill_body(body, tid, self.decode.handshake)
        leg = asyncio.create_task(s.post(self.prefill.url + "/v1/completions", json=pre))
        stamps = await stream_stamps(s, self.decode.url, decode_body(body, tid))
        (await leg).release()
        return stamps


class PrefillOnly(Target):
    """An arrival that only keeps the prefill node busy: the PD prefill leg's work (the prompt, one token), with
    nothing pushed and no decode leg. The control for "with arrivals": on a box where the prefill node shares the
    machine, it tells the cost of a busy neighbour from the cost of receiving KV."""

    async def run(self, s: aiohttp.ClientSession, body: dict) -> list[float]:
        self.sent += 1
        async with s.post(self.prefill.url + "/v1/completions", json=dict(body, max_tokens=1)) as r:
            r.raise_for_status()
            await r.read()
        return []


async def one_round(target: Target, args, rng: random.Random, arrivals: Target | None) -> list[float]:
    """Per-token gaps of the running requests (sent to `target`) while a new request goes to `arrivals` every
    `args.every_s` seconds (none when it is None)."""
    def prompt(n: int) -> list[int]:
        return [rng.randrange(10, 1000) for _ in range(n)]
    running = {"model": "tiny", "max_tokens": args.tokens, "ignore_eos": True, "temperature": 0}
    arriving = {"model": "tiny", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        streams = [asyncio.create_task(target.run(s, dict(running, prompt=prompt(args.stream_prompt))))
                   for _ in range(args.streams)]
        extra = []
        await asyncio.sleep(args.every_s)
        while arrivals is not None and not all(t.done() for t in streams):
            extra.append(asyncio.create_task(arrivals.run(s, dict(arriving, prompt=prompt(args.arrival_tokens)))))
            await asyncio.sleep(args.every_s)
        stamps = [await t for t in streams]
        await asyncio.gather(*extra)
    steady = max(st[0] for st in stamps)  # every running request has its first token: their prefills are over
    return [b - a for st in stamps for a, b in zip(st, st[1:]) if a >= steady]


class WorkerHooks:
    """The decode worker's hook counters (`kvbridge_connector_hook_*`), read from its metrics endpoint."""

    STEP = "bind_connector_metadata"  # called once per engine step in a worker

    def __init__(self, metrics_url: str) -> None:
        self.url = metrics_url

    def read(self) -> dict[str, tuple[float, float]]:
        """hook -> (seconds, calls) so far."""
        text = requests.get(self.url, timeout=10).text
        out: dict[str, list[float]] = {}
        for kind, hook, value in re.findall(r'^kvbridge_connector_hook_(seconds|calls)_total\{hook="(\w+)"\} (\S+)$',
                                            text, re.M):
            out.setdefault(hook, [0.0, 0.0])[kind == "calls"] = float(value)
        return {hook: (s, c) for hook, (s, c) in out.items()}

    @classmethod
    def per_step_us(cls, before: dict, after: dict) -> tuple[float, dict[str, float]]:
        """(total microseconds per engine step, per hook) between two reads."""
        steps = after.get(cls.STEP, (0, 0))[1] - before.get(cls.STEP, (0, 0))[1]
        if steps <= 0:
            return float("nan"), {}
        per = {h: (s - before.get(h, (0, 0))[0]) / steps * 1e6 for h, (s, _) in after.items()}
        return sum(per.values()), per


def round_stats(gaps: list[float]) -> tuple[float, float]:
    """(median per-token ms, p90 per-token ms) of one round."""
    return statistics.median(gaps) * 1000, statistics.quantiles(gaps, n=10)[-1] * 1000


def over_rounds(stats: list[tuple[float, float]]) -> tuple[float, float]:
    """(median, p90): each the median over rounds."""
    return statistics.median(m for m, _ in stats), statistics.median(p for _, p in stats)


def paired(num: list[tuple[float, float]], den: list[tuple[float, float]]) -> tuple[float, float]:
    """(median ratio, p90 ratio): each the median of the rounds' own ratios."""
    return over_rounds([(n[0] / d[0], n[1] / d[1]) for n, d in zip(num, den)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128, help="tokens each running request decodes")
    ap.add_argument("--stream-prompt", type=int, default=256, help="prompt tokens of each running request")
    ap.add_argument("--arrival-tokens", type=int, default=400, help="prompt tokens of each arriving request")
    ap.add_argument("--every-s", type=float, default=1.5, help="one new request this often")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-connector", type=json.loads, default={},
                    help='extra kvbridge settings for the decode node, e.g. \'{"gil_switch_interval_ms": 5}\'')
    args = ap.parse_args()
    make_tiny_model(MODEL, "bench")
    agg = start("agg", env={"VLLM_CPU_OMP_THREADS_BIND": "1"})  # the decode node's core: per-token times compare
    pre = start("kvb-prefill", "prefill")
    metrics_port = free_port()
    dec = start_vllm("bench-kvb-decode", "decode", dict(args.decode_connector, metrics_port=metrics_port),
                     model=MODEL, max_model_len=4096)
    hooks = WorkerHooks(f"http://127.0.0.1:{metrics_port}/metrics")
    # (target, load) -> where arrivals go. Load "plain" sends the streams to kvbridge's decode node without PD;
    # "prefill busy" sends arrivals to the prefill node alone (nothing pushed); aggregated's "no arrivals" is the
    # baseline of kvbridge's loads without arrivals, its "with arrivals" of the two with them
    pd = Target(dec, pre)
    runs = {("aggregated", "no arrivals"): (Target(agg), None),
            ("aggregated", "with arrivals"): (Target(agg), Target(agg)),
            ("kvbridge", "plain"): (Target(dec), None), ("kvbridge", "no arrivals"): (pd, None),
            ("kvbridge", "prefill busy"): (pd, PrefillOnly(dec, pre)),
            ("kvbridge", "with arrivals"): (pd, Target(dec, pre))}
    rounds: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in runs}  # each round's stats
    hook_sums: dict[str, dict[str, tuple[float, float]]] = {}  # load -> hook -> (seconds, calls) over its rounds
    try:
        for s in (agg, pre, dec):
            s.wait_ready(900)
        for name, target in {"aggregated": Target(agg), "kvbridge": Target(dec, pre)}.items():
            asyncio.run(one_round(target, args, random.Random(9), arrivals=None))  # warm-up
        for r in range(args.repeats):  # each round runs every load once: drifts of the shared box hit all alike
            for (name, load), (target, arrivals) in runs.items():
                before = hooks.read() if name == "kvbridge" else {}
                rounds[name, load].append(round_stats(asyncio.run(one_round(target, args, random.Random(r), arrivals))))
                if name == "kvbridge":
                    sums = hook_sums.setdefault(load, {})
                    for hook, (sec, calls) in hooks.read().items():
                        was, had = before.get(hook, (0.0, 0.0)), sums.get(hook, (0.0, 0.0))
                        sums[hook] = (had[0] + sec - was[0], had[1] + calls - was[1])
                med, p90 = rounds[name, load][-1]
                print(f"  round {r}: {name:10} {load:13}: per token median {med:.2f} ms, p90 {p90:.2f} ms", flush=True)
    finally:
        for s in (agg, pre, dec):
            s.stop()
    print(f"\n{args.streams} running requests x {args.tokens} tokens; arrivals: one {args.arrival_tokens}-token "
          f"prompt every {args.every_s} s (medians of {args.repeats} rounds; paired: the median of each round's "
          "kvbridge / aggregated)")
    print("kvbridge load   aggregated med/p90 ms   kvbridge decode med/p90 ms   paired ratio med / p90   "
          "worker hooks us/step")
    for load in ("plain", "no arrivals", "prefill busy", "with arrivals"):
        agg_rounds = rounds["aggregated", "with arrivals" if runs["kvbridge", load][1] else "no arrivals"]
        kvb_rounds = rounds["kvbridge", load]
        (am, ap90), (km, kp90) = over_rounds(agg_rounds), over_rounds(kvb_rounds)
        ratio_med, ratio_p90 = paired(kvb_rounds, agg_rounds)
        total, per = WorkerHooks.per_step_us({}, hook_sums[load])
        print(f"{load:15} {am:8.2f} / {ap90:6.2f}      {km:8.2f} / {kp90:6.2f}         {ratio_med:6.2f} / "
              f"{ratio_p90:4.2f}          {total:8.1f}")
        print(f"{'':15} per hook: " + ", ".join(f"{h} {us:.1f}" for h, us in sorted(per.items())))
    cost_med, cost_p90 = paired(rounds["kvbridge", "with arrivals"], rounds["kvbridge", "prefill busy"])
    print("what receiving the arrivals' KV costs the running requests, kvbridge with arrivals / prefill busy, paired: "
          f"median {cost_med:.2f}, p90 {cost_p90:.2f}")
    # Both loads run the same streams (same prompts): what the hooks spent beyond "prefill busy" is the arrivals'
    extra_s = sum(sec for sec, _ in hook_sums["with arrivals"].values()) - sum(
        sec for sec, _ in hook_sums["prefill busy"].values())
    arrived = runs["kvbridge", "with arrivals"][1].sent
    print(f"the decode worker's hooks spent about {extra_s / arrived * 1000:.2f} ms per arrival on its engine thread "
          f"({arrived} arrivals of {args.arrival_tokens} tokens: verifying and scattering their KV), in the steps "
          "that take it in")


if __name__ == "__main__":
    main()

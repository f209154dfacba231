"""Per-token time of running decodes while new requests keep arriving: kvbridge's decode node against aggregated vLLM.

`--streams` requests (default 8) decode `--tokens` tokens each, streamed; while they run, a new request with a
`--arrival-tokens`-token prompt arrives every `--every-s` seconds. On kvbridge every request is a PD request
(prefill node on core 0, decode node on core 1): an arrival's KV is pushed into the decode node while the
streams decode there. On aggregated vLLM (on core 1 too) the same arrivals are prefilled by the node that decodes.
Each configuration also runs without arrivals, and kvbridge's decode node once more serving the same streams as
plain requests (prefilled by itself, no transfer ever): the table shows what the connector costs a decode loop
that never receives, one with no transfer in flight, and one receiving arrivals. Per-token time is the gap
between consecutive streamed tokens of the running requests once all of them have their first token, median and
p90; the median of `--repeats` rounds is printed, with the ratio kvbridge / aggregated measured in the same run.
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

    async def run(self, s: aiohttp.ClientSession, body: dict) -> list[float]:
        if self.prefill is None:
            return await stream_stamps(s, self.decode.url, body)
        tid = uuid.uuid4().hex
        pre = dict(body, max_tokens=1, kv_transfer_params={"kvbridge": {"transfer_id": tid,
                                                                         "push_to": self.decode.handshake}})
        dec = dict(body, kv_transfer_params={"kvbridge": {"transfer_id": tid, "receive": True}})
        leg = asyncio.create_task(s.post(self.prefill.url + "/v1/completions", json=pre))
        stamps = await stream_stamps(s, self.decode.url, dec)
        (await leg).release()
        return stamps


async def one_round(target: Target, args, rng: random.Random, arrivals: bool) -> list[float]:
    def prompt(n: int) -> list[int]:
        return [rng.randrange(10, 1000) for _ in range(n)]
    running = {"model": "tiny", "max_tokens": args.tokens, "ignore_eos": True, "temperature": 0}
    arriving = {"model": "tiny", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        streams = [asyncio.create_task(target.run(s, dict(running, prompt=prompt(args.stream_prompt))))
                   for _ in range(args.streams)]
        extra = []
        await asyncio.sleep(args.every_s)
        while arrivals and not all(t.done() for t in streams):
            extra.append(asyncio.create_task(target.run(s, dict(arriving, prompt=prompt(args.arrival_tokens)))))
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


def summarize(rounds: list[list[float]]) -> tuple[float, float]:
    """(median per-token ms, p90 per-token ms): each the median over rounds."""
    med = statistics.median(statistics.median(r) * 1000 for r in rounds)
    p90 = statistics.median(statistics.quantiles(r, n=10)[-1] * 1000 for r in rounds)
    return med, p90


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
    # (target, load): load "plain" sends the streams to kvbridge's decode node without PD; aggregated's
    # "no arrivals" is the baseline of both of kvbridge's loads without arrivals
    runs = [("aggregated", Target(agg), "no arrivals"), ("aggregated", Target(agg), "with arrivals"),
            ("kvbridge", Target(dec), "plain"), ("kvbridge", Target(dec, pre), "no arrivals"),
            ("kvbridge", Target(dec, pre), "with arrivals")]
    results: dict[tuple[str, str], tuple[float, float]] = {}
    hook_us: dict[str, tuple[float, dict[str, float]]] = {}
    try:
        for s in (agg, pre, dec):
            s.wait_ready(900)
        for name, target in {"aggregated": Target(agg), "kvbridge": Target(dec, pre)}.items():
            asyncio.run(one_round(target, args, random.Random(9), arrivals=False))  # warm-up
        for name, target, load in runs:
            before = hooks.read() if name == "kvbridge" else {}
            rounds = [asyncio.run(one_round(target, args, random.Random(r), load == "with arrivals"))
                      for r in range(args.repeats)]
            results[name, load] = summarize(rounds)
            if name == "kvbridge":
                hook_us[load] = WorkerHooks.per_step_us(before, hooks.read())
            print(f"  {name:10} {load:13}: per token median {results[name, load][0]:.2f} ms, "
                  f"p90 {results[name, load][1]:.2f} ms", flush=True)
    finally:
        for s in (agg, pre, dec):
            s.stop()
    print(f"\n{args.streams} running requests x {args.tokens} tokens; arrivals: one {args.arrival_tokens}-token "
          f"prompt every {args.every_s} s (medians of {args.repeats} rounds)")
    print("kvbridge load   aggregated med/p90 ms   kvbridge decode med/p90 ms   ratio med   ratio p90   "
          "worker hooks us/step")
    for load in ("plain", "no arrivals", "with arrivals"):
        (am, ap90) = results["aggregated", "with arrivals" if load == "with arrivals" else "no arrivals"]
        km, kp90 = results["kvbridge", load]
        total, per = hook_us[load]
        print(f"{load:15} {am:8.2f} / {ap90:6.2f}      {km:8.2f} / {kp90:6.2f}         {km / am:6.2f}     "
              f"{kp90 / ap90:6.2f}   {total:8.1f}")
        print(f"{'':15} per hook: " + ", ".join(f"{h} {us:.1f}" for h, us in sorted(per.items())))


if __name__ == "__main__":
    main()

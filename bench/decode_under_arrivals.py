"""Per-token time of running decodes while new requests keep arriving: kvbridge's decode node against aggregated vLLM.

`--streams` requests (default 8) decode `--tokens` tokens each, streamed; while they run, a new request with a
`--arrival-tokens`-token prompt arrives every `--every-s` seconds. On kvbridge every request is a PD request
(prefill node on core 0, decode node on core 1): an arrival's KV is pushed into the decode node while the
streams decode there. On aggregated vLLM (on core 1 too) the same arrivals are prefilled by the node that decodes.
Each configuration also runs without arrivals, so the table shows what the connector costs a decode loop with
no transfer in flight and what arriving transfers cost it. Per-token time is the gap between consecutive
streamed tokens of the running requests once all of them have their first token, median and p90; the
median of `--repeats` rounds is printed, with the ratio kvbridge / aggregated measured in the same run.

    python -m bench.decode_under_arrivals [--streams 8] [--tokens 128] [--every-s 1.5] [--repeats 3]

The arrival rate must be one the aggregated node can prefill besides decoding, or its queue only grows.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import uuid

import aiohttp

from bench.pd_bench import MODEL, hook_costs_us, start
from launch.local_servers import start_vllm
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
    args = ap.parse_args()
    make_tiny_model(MODEL, "bench")
    agg = start("agg", env={"VLLM_CPU_OMP_THREADS_BIND": "1"})  # the decode node's core: per-token times compare
    pre = start("kvb-prefill", "prefill")
    dec = start_vllm("bench-kvb-decode", "decode", {}, model=MODEL, max_model_len=4096)
    targets = {"aggregated": Target(agg), "kvbridge": Target(dec, pre)}
    results: dict[tuple[str, bool], tuple[float, float]] = {}
    try:
        for s in (agg, pre, dec):
            s.wait_ready(900)
        for name, target in targets.items():
            asyncio.run(one_round(target, args, random.Random(9), arrivals=False))  # warm-up
            for arrivals in (False, True):
                rounds = [asyncio.run(one_round(target, args, random.Random(r), arrivals)) for r in range(args.repeats)]
                results[name, arrivals] = summarize(rounds)
                print(f"  {name:10} arrivals={'yes' if arrivals else 'no ':3}: per token median "
                      f"{results[name, arrivals][0]:.2f} ms, p90 {results[name, arrivals][1]:.2f} ms", flush=True)
    finally:
        for s in (agg, pre, dec):
            s.stop()
    print(f"\n{args.streams} running requests x {args.tokens} tokens; arrivals: one {args.arrival_tokens}-token "
          f"prompt every {args.every_s} s (medians of {args.repeats} rounds)")
    print("load               aggregated med/p90 ms   kvbridge decode med/p90 ms   ratio med   ratio p90")
    for arrivals in (False, True):
        (am, ap90), (km, kp90) = results["aggregated", arrivals], results["kvbridge", arrivals]
        print(f"{'with arrivals' if arrivals else 'no arrivals':18} {am:8.2f} / {ap90:6.2f}      "
              f"{km:8.2f} / {kp90:6.2f}         {km / am:6.2f}     {kp90 / ap90:6.2f}")
    hooks = hook_costs_us(dec.log_path)
    if hooks:
        print(f"kvbridge decode node, connector hooks per engine step (worker): median {statistics.median(hooks):.1f} us "
              f"over the run's 10 s reports")


if __name__ == "__main__":
    main()

"""Multi-turn chat through two routers in one run: round robin (every prompt prefilled remotely) against
prefix-aware placement with conditional disaggregation, both in front of the same 2 prefill + 1 decode vLLM.

N users share a long system prompt and grow their own history over M rounds (each round: the whole
conversation so far plus a new question; the answer joins the history). Each router gets its own
conversations (same lengths, other words), so neither warms the other's prefixes; within a round the
routers go in alternating order. Per round and router it prints TTFT p50/p90 (streamed, first event) and
the prompt tokens vLLM computed on all three nodes (`vllm:prompt_tokens_by_source{source="local_compute"}`,
the rest being prefix-cache hits or transferred KV), and the ratio prefix-aware / round robin. Writes a
PNG when matplotlib is installed.

    python bench/multiturn_bench.py [--users 4] [--rounds 4] [--system-words 300] [--out multiturn.png]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import aiohttp

from launch.local_servers import MODEL_DIR, SERVED_MODEL, free_port, start_router, start_vllm
from launch.tiny_model import make_tiny_model
from launch.tiny_prompts import random_words
from router.config import RouterConfig

ROUTERS = {"round_robin": {"policy": "round_robin", "placement": {"mode": "always"}},
           "prefix_aware": {"policy": "prefix_aware", "placement": {"mode": "auto"}}}


def computed_tokens(metrics_text: str) -> float:
    """Prompt tokens this vLLM computed itself (not found in its prefix cache, not received as KV)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("vllm:prompt_tokens_by_source_total{") and 'source="local_compute"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def computed_on(session: aiohttp.ClientSession, urls: list[str]) -> float:
    total = 0.0
    for url in urls:
        async with session.get(url + "/metrics") as r:
            total += computed_tokens(await r.text())
    return total


async def settled_computed(session: aiohttp.ClientSession, urls: list[str]) -> float:
    """computed_on once two reads 0.25 s apart agree: vLLM updates its counters a little after the answers."""
    prev = await computed_on(session, urls)
    for _ in range(20):
        await asyncio.sleep(0.25)
        now = await computed_on(session, urls)
        if now == prev:
            break
        prev = now
    return prev


async def turn(session: aiohttp.ClientSession, router: str, prompt: str, max_tokens: int) -> tuple[float, str]:
    """Streamed completion: seconds to the first event, and the whole answer's text."""
    body = {"model": SERVED_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0, ttft, text = time.perf_counter(), None, []
    async with session.post(router + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{router}: HTTP {r.status} {await r.text()}")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            text.append(json.loads(line[6:])["choices"][0].get("text", ""))
    return ttft or time.perf_counter() - t0, "".join(text)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run(args: argparse.Namespace, routers: dict[str, str], nodes: list[str]) -> list[dict]:
    rows: list[dict] = []
    histories = {name: [random_words(args.system_words, seed=7 + k) for _ in range(args.users)]
                 for k, name in enumerate(routers)}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        for rnd in range(args.rounds):
            order = list(routers) if rnd % 2 == 0 else list(reversed(routers))
            for name in order:
                hist = histories[name]
                prompts = [f"{h}\nUser: {random_words(args.turn_words, seed=1000 * rnd + u)}\nAssistant:"
                           for u, h in enumerate(hist)]
                before = await settled_computed(s, nodes)
                done = await asyncio.gather(*(turn(s, routers[name], p, args.answer_tokens) for p in prompts))
                computed = await settled_computed(s, nodes) - before
                for u, (_, answer) in enumerate(done):
                    hist[u] = prompts[u] + answer
                ttfts = [t * 1000 for t, _ in done]
                rows.append({"round": rnd + 1, "router": name, "ttft_p50_ms": statistics.median(ttfts),
                             "ttft_p90_ms": pct(ttfts, 0.9), "prefill_tokens": computed,
                             "prompt_chars": sum(len(p) for p in prompts)})
                print(json.dumps(rows[-1]), flush=True)
        for name, url in routers.items():  # what each router decided, and what it learned
            async with s.get(url + "/metrics") as r:
                decided = [line for line in (await r.text()).splitlines()
                           if line.startswith("kvbridge_router_placement_total{")]
            async with s.get(url + "/debug/placement") as r:
                rates = (await r.json())["rates"]
            print(f"{name}: {' '.join(decided)}\n  learned: {json.dumps(rates)}")
    return rows


def table(rows: list[dict]) -> str:
    out = ["| round | router | TTFT p50 ms | TTFT p90 ms | prompt tokens computed | ratio p50 / tokens (pa / rr) |",
           "|---|---|---|---|---|---|"]
    by = {(r["round"], r["router"]): r for r in rows}
    for r in rows:
        rr = by.get((r["round"], "round_robin"))
        ratio = "" if r["router"] == "round_robin" or not rr else (
            f"{r['ttft_p50_ms'] / rr['ttft_p50_ms']:.2f} / "
            + (f"{r['prefill_tokens'] / rr['prefill_tokens']:.2f}" if rr["prefill_tokens"] else "-"))
        out.append(f"| {r['round']} | {r['router']} | {r['ttft_p50_ms']:.0f} | {r['ttft_p90_ms']:.0f} | "
                   f"{r['prefill_tokens']:.0f} | {ratio} |")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG, the table above is the result"
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ROUTERS:
        rs = [r for r in rows if r["router"] == name]
        a.plot([r["round"] for r in rs], [r["ttft_p50_ms"] for r in rs], marker="o", label=f"{name} p50")
        a.plot([r["round"] for r in rs], [r["ttft_p90_ms"] for r in rs], linestyle="--", label=f"{name} p90")
        b.plot([r["round"] for r in rs], [r["prefill_tokens"] for r in rs], marker="o", label=name)
    a.set(xlabel="round", ylabel="TTFT ms", title="time to first token")
    b.set(xlabel="round", ylabel="tokens", title="prompt tokens computed")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    return f"wrote {path}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--system-words", type=int, default=300)
    ap.add_argument("--turn-words", type=int, default=20)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--out", default="multiturn.png")
    args = ap.parse_args()
    make_tiny_model(MODEL_DIR)
    prefill_args = ("--enable-prompt-tokens-details",)  # cached_tokens in replies: the router's index corrections
    vllm = [start_vllm("mt-prefill-0", "prefill", vllm_args=prefill_args),
            start_vllm("mt-prefill-1", "prefill", vllm_args=prefill_args),
            start_vllm("mt-decode-0", "decode", {"num_slots": 32})]
    started = []
    try:
        for v in vllm:
            v.wait_ready()
        p0, p1, d = vllm
        for name, cfg in ROUTERS.items():
            started.append(start_router(RouterConfig.model_validate({
                "port": free_port(), "model": SERVED_MODEL, **cfg,
                "prefill": [{"name": p.name, "url": p.url} for p in (p0, p1)],
                "decode": [{"name": d.name, "url": d.url, "kv_address": d.handshake}]})))
        rows = asyncio.run(run(args, {n: r.url for n, r in zip(ROUTERS, started)}, [v.url for v in vllm]))
    finally:
        for p in started + vllm:
            p.stop()
    print(f"\n{args.users} users, {args.rounds} rounds, system prompt {args.system_words} words, "
          f"{args.turn_words} words a question, {args.answer_tokens} tokens an answer; tiny model on CPU, "
          "a machine shared with other engineers' runs: read the ratios, measured in this run")
    print(table(rows))
    print(plot(rows, args.out))


if __name__ == "__main__":
    main()

"""The tiered store's speed: put/get GB/s per tier for a chunk-sized payload (next to a memcpy of the same
bytes), and TTFT of a repeated 2k-token prefix with and without the store, measured in one run.

    python bench/store_bench.py [--chunk-mib 8] [--repeats 7] [--skip-ttft]

Tiers: memory (a copy in; `get` hands back the kept tensor, no copy), disk (fsync per put; reads come from
the page cache, as repeated prefixes will), Redis (a local redis-server, the Debian package). TTFT: the
bench model (8 layers, 32 KiB/token fp32) on two producer vLLM servers that differ only in the store, both
without vLLM's own prefix cache; each request is a shared 2000-token prefix plus a fresh 32-token suffix,
sent to both servers in turn; the first request primes the store and is not counted.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from bench.pd_bench import MODEL, stream_ttft
from launch.local_servers import start_vllm
from launch.redis_server import RedisServer
from launch.tiny_model import make_tiny_model
from launch.tiny_prompts import random_token_prompt
from storage.disk_tier import DiskTier
from storage.memory_tier import MemoryTier
from storage.redis_tier import RedisTier


def median_s(fn, n: int) -> float:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def tier_rows(nbytes: int, repeats: int) -> list[tuple[str, float]]:
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(data)
    rows = [("memcpy (same bytes)", median_s(lambda i: dst.copy_(data), repeats))]
    server = RedisServer(maxmemory="2gb")
    with tempfile.TemporaryDirectory() as d:
        tiers = [MemoryTier(4 * nbytes * repeats), DiskTier(d, 4 * nbytes * repeats), RedisTier(server.url)]
        try:
            for t in tiers:
                rows.append((f"{t.name} put", median_s(lambda i, t=t: t.put(f"{i:032x}", data), repeats)))
                rows.append((f"{t.name} get", median_s(lambda i, t=t: t.get(f"{i:032x}"), repeats)))
                assert torch.equal(t.get(f"{0:032x}"), data), f"{t.name} returned different bytes"
        finally:
            for t in tiers:
                t.close()
            server.stop()
    return rows


def ttft_rows(repeats: int) -> tuple[float, float, bool]:
    make_tiny_model(MODEL, size="bench")
    with tempfile.TemporaryDirectory() as d:
        store = {"memory_bytes": "2GiB", "disk_path": d}
        args = ("--no-enable-prefix-caching",)
        servers = [start_vllm("bench-store", "prefill", {"store": store}, model=MODEL, max_model_len=4096,
                              vllm_args=args),
                   start_vllm("bench-nostore", "prefill", {}, model=MODEL, max_model_len=4096, vllm_args=args)]
        try:
            for s in servers:
                s.wait_ready(900)
            prefix = random_token_prompt(2000, 7)
            times: dict[str, list[float]] = {s.name: [] for s in servers}
            same = True
            for i in range(repeats + 1):
                body = {"model": "tiny", "prompt": prefix + random_token_prompt(32, 100 + i), "max_tokens": 4,
                        "temperature": 0}
                texts = []
                for s in servers:
                    ttft, text = stream_ttft(s.url, body)
                    texts.append(text)
                    if i > 0:
                        times[s.name].append(ttft)
                same &= texts[0] == texts[1]
            return statistics.median(times["bench-store"]), statistics.median(times["bench-nostore"]), same
        finally:
            for s in servers:
                s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk-mib", type=float, default=8.0, help="payload size (the bench model's 256-token chunk)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-ttft", action="store_true")
    a = ap.parse_args()
    nbytes = int(a.chunk_mib * 2**20)
    rows = tier_rows(nbytes, max(a.repeats, 5))
    base = nbytes / rows[0][1] / 1e9
    print(f"tiers, {nbytes / 2**20:.1f} MiB payload, median of {max(a.repeats, 5)}:")
    for name, t in rows:
        gbs = nbytes / t / 1e9
        print(f"  {name:22} {gbs:9.2f} GB/s  {gbs / base:6.2f} x memcpy")
    if a.skip_ttft:
        return
    with_store, without, same = ttft_rows(a.repeats)
    print(f"TTFT, 2000-token shared prefix + 32 fresh tokens, median of {a.repeats}:")
    print(f"  with the store    {with_store * 1000:8.1f} ms")
    print(f"  without the store {without * 1000:8.1f} ms")
    print(f"  ratio             {with_store / without:8.3f}   (tokens equal in every pair: {same})")


if __name__ == "__main__":
    main()

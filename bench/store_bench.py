"""The tiered store's speed: put/get GB/s per tier for a chunk-sized payload (next to a memcpy of the same
bytes and the disk's raw sequential write/read), the engine thread's time per put and per lookup (Redis up
and Redis stopped), and TTFT of a repeated 2k-token prefix with and without the store, measured in one run.

    python bench/store_bench.py [--chunk-mib 8] [--repeats 7] [--skip-ttft]

Tiers: memory (a copy into its arena; `get` copies out, a load reads in place), disk (`put`: one chunk per
fsync; `put_many`: a batch of `repeats` chunks, one fsync pass, as the background writer does; `load`: read
into a memory slot, as a store load does; reads come from the page cache, as repeated prefixes will),
Redis (a local redis-server, the Debian package). Raw disk:
the same bytes written to one file with one fsync, and read back. TTFT: the bench model (8 layers, 32 KiB/token
fp32) on two producer vLLM servers that differ only in the store, both without vLLM's own prefix cache; each
request is a shared 2000-token prefix plus a fresh 32-token suffix, sent to both servers in turn; the first
request primes the store and is not counted. The store server's own timers then give the engine thread's
time per put and per lookup.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import urllib.request

import torch

from bench.pd_bench import MODEL, stream_ttft
from launch.local_servers import free_port, start_vllm
from launch.redis_server import RedisServer
from launch.tiny_model import make_tiny_model
from launch.tiny_prompts import random_token_prompt
from storage.disk_tier import DiskTier
from storage.memory_tier import MemoryTier
from storage.redis_tier import RedisTier
from storage.tiered_store import TieredStore


def median_s(fn, n: int) -> float:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def raw_disk_s(d: str, data: torch.Tensor, n: int) -> tuple[float, float]:
    """Seconds per payload for a sequential write of n payloads to one file with one fsync, and a read back."""
    buf, path = memoryview(data.numpy()), os.path.join(d, "raw")
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    write = (time.perf_counter() - t0) / n
    out = memoryview(torch.empty_like(data).numpy())
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        for _ in range(n):
            f.readinto(out)
    read = (time.perf_counter() - t0) / n
    os.unlink(path)
    return write, read


def tier_rows(nbytes: int, repeats: int) -> list[tuple[str, float]]:
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    dst = torch.zeros_like(data)  # touched: the memcpy baseline pays no page faults, as the arena does not
    rows = [("memcpy (same bytes)", median_s(lambda i: dst.copy_(data), repeats))]
    server = RedisServer(maxmemory="2gb")
    with tempfile.TemporaryDirectory(dir=os.environ.get("KVBRIDGE_BENCH_DISK")) as d:
        raw_w, raw_r = raw_disk_s(d, data, repeats)
        tiers = [MemoryTier(4 * nbytes * repeats), DiskTier(d, 4 * nbytes * repeats), RedisTier(server.url)]
        try:
            for t in tiers:
                if t.name == "disk":
                    rows.append(("disk raw write (fsync)", raw_w))
                rows.append((f"{t.name} put", median_s(lambda i, t=t: t.put(f"{i:032x}", data), repeats)))
                if t.name == "disk":
                    t0 = time.perf_counter()
                    t.put_many([(f"{i + 1000:032x}", data) for i in range(repeats)])
                    rows.append((f"disk put_many ({repeats})", (time.perf_counter() - t0) / repeats))
                    rows.append(("disk raw read", raw_r))
                get = f"{t.name} get" + (" (copy out)" if t.name == "memory" else "")
                rows.append((get, median_s(lambda i, t=t: t.get(f"{i:032x}"), repeats)))
                if t.name == "disk":  # what a load does: read into a memory slot, which promotes it too
                    store = TieredStore([MemoryTier(4 * nbytes * repeats), t])
                    rows.append(("disk load into memory", median_s(lambda i: store.load(f"{i:032x}", len), repeats)))
                    store.close()
                assert torch.equal(t.get(f"{0:032x}"), data), f"{t.name} returned different bytes"
        finally:
            for t in tiers:
                t.close()
            server.stop()
    return rows


def engine_rows(nbytes: int, repeats: int) -> list[tuple[str, float]]:
    """The caller's time for a store put (memory + disk + Redis behind) and a lookup of 8 keys, with Redis
    answering and with Redis stopped (SIGSTOP)."""
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    server = RedisServer(maxmemory="2gb")
    with tempfile.TemporaryDirectory(dir=os.environ.get("KVBRIDGE_BENCH_DISK")) as d:
        store = TieredStore([MemoryTier(4 * nbytes * repeats), DiskTier(d, 4 * nbytes * repeats),
                             RedisTier(server.url)])
        try:
            put = median_s(lambda i: store.put(f"{i:032x}", data), repeats)
            store.flush(60)
            keys = [f"{i:032x}" for i in range(8)]
            up = median_s(lambda i: store.lookup(keys), repeats)
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                down = 0.0
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    store.lookup(keys)
                    down = max(down, time.perf_counter() - t0)
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
        finally:
            store.close()
            server.stop()
    return [("store put", put), ("lookup, Redis up", up), ("lookup, Redis stopped (worst)", down)]


def histogram_means(metrics_url: str) -> dict[str, tuple[float, int]]:
    """(mean seconds, count) of the store server's put and lookup timers, from its Prometheus page."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out = {}
    for name, labels in (("put", 'kvbridge_store_op_seconds_{}{{op="put",tier="store"}}'),
                         ("lookup asked", 'kvbridge_store_lookup_seconds_{}{{answer="asked"}}'),
                         ("lookup cached", 'kvbridge_store_lookup_seconds_{}{{answer="cached"}}')):
        vals = [re.search(re.escape(labels.format(k)) + r" (\S+)", text) for k in ("sum", "count")]
        if all(vals):
            total, count = (float(v.group(1)) for v in vals)
            out[name] = (total / count if count else 0.0, int(count))
    return out


def ttft_rows(repeats: int) -> tuple[float, float, bool, dict[str, tuple[float, int]]]:
    make_tiny_model(MODEL, size="bench")
    metrics_port = free_port()
    with tempfile.TemporaryDirectory() as d:
        store = {"memory_bytes": "2GiB", "disk_path": d}
        args = ("--no-enable-prefix-caching",)
        servers = [start_vllm("bench-store", "prefill", {"store": store, "metrics_port": metrics_port}, model=MODEL,
                              max_model_len=4096, vllm_args=args),
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
            timers = histogram_means(f"http://127.0.0.1:{metrics_port}/metrics")
            return statistics.median(times["bench-store"]), statistics.median(times["bench-nostore"]), same, timers
        finally:
            for s in servers:
                s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk-mib", type=float, default=8.0, help="payload size (the bench model's 256-token chunk)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-ttft", action="store_true")
    a = ap.parse_args()
    sys.setswitchinterval(0.0005)  # as the worker sets it: the writer thread must not hold the caller for 5 ms
    nbytes = int(a.chunk_mib * 2**20)
    n = max(a.repeats, 5)
    rows = tier_rows(nbytes, n)
    t = dict(rows)
    base = nbytes / rows[0][1] / 1e9
    print(f"tiers, {nbytes / 2**20:.1f} MiB payload, median of {n}:")
    for name, sec in rows:
        gbs = nbytes / sec / 1e9
        raw = (t["disk raw read"] if name in ("disk get", "disk load into memory")
               else t["disk raw write (fsync)"] if "disk put" in name else 0)
        beside = f"  {raw / sec:5.2f} x raw disk" if raw else ""
        print(f"  {name:24} {gbs:9.2f} GB/s  {gbs / base:6.2f} x memcpy{beside}")
    print(f"engine thread, {nbytes / 2**20:.1f} MiB chunks (memory + disk + Redis store; lookups of 8 keys):")
    for name, sec in engine_rows(nbytes, n):
        print(f"  {name:30} {sec * 1e6:10.1f} us")
    if a.skip_ttft:
        return
    with_store, without, same, timers = ttft_rows(a.repeats)
    print(f"TTFT, 2000-token shared prefix + 32 fresh tokens, median of {a.repeats}:")
    print(f"  with the store    {with_store * 1000:8.1f} ms")
    print(f"  without the store {without * 1000:8.1f} ms")
    print(f"  ratio             {with_store / without:8.3f}   (tokens equal in every pair: {same})")
    print("engine thread inside the store server (its own timers, mean):")
    for name in ("put", "lookup asked", "lookup cached"):
        mean, count = timers.get(name, (float("nan"), 0))
        print(f"  {name:16} {mean * 1e6:10.1f} us  over {count}")

if __name__ == "__main__":
    main()

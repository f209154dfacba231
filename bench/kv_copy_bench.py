"""Gather/scatter GB/s for a Llama-3-8B-shaped cache (32 layers, 8 KV heads, head 128, bf16, block 16,
4096 tokens in random blocks), next to a plain copy of the same bytes and the torch fallback, one run
(medians of --repeats).

    python -m bench.kv_copy_bench [--device cuda] [--layout LBNHC] [--repeats 10]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.llama_cache import BLOCK, ORDER, llama_layout, llama_views
from pd.block_copy import SegmentBlockCopy, TorchBlockCopy

TOKENS = 4096


def timed(fn, device: str, repeats: int, inner: int = 20) -> float:
    """Median seconds per call. On a GPU each repeat times `inner` back-to-back calls between CUDA
    events, so launch overhead does not count against sub-millisecond copies."""
    fn()
    out = []
    for _ in range(repeats):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            stop.record()
            stop.synchronize()
            out.append(start.elapsed_time(stop) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--layout", default="LBNHC", choices=list(ORDER))
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    dev = torch.device(a.device)
    n_blocks = TOKENS // BLOCK
    views = llama_views(a.layout, 2 * n_blocks, a.device)
    for v in views:
        v.copy_(torch.randn(v.shape, device=dev))
    blocks = torch.randperm(2 * n_blocks)[:n_blocks].tolist()
    nbytes = llama_layout(a.layout).bytes_per_block * n_blocks
    chunk, other = (torch.empty(nbytes, dtype=torch.uint8, device=dev) for _ in range(2))
    fast, slow = SegmentBlockCopy(views, dev), TorchBlockCopy(views, dev)
    rows = {
        "copy (same bytes)": timed(lambda: chunk.copy_(other), a.device, a.repeats),
        "gather (csrc)": timed(lambda: fast.gather(blocks, chunk), a.device, a.repeats),
        "scatter (csrc)": timed(lambda: fast.scatter(blocks, chunk), a.device, a.repeats),
        "gather (torch fallback)": timed(lambda: slow.gather(blocks, chunk), a.device, a.repeats),
    }
    base = nbytes / rows["copy (same bytes)"] / 1e9
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{nbytes / 2**20:.0f} MiB, {len(fast.runs.segments(blocks, 0))} segments, layout {a.layout}, device {name}")
    for name, t in rows.items():
        gbs = nbytes / t / 1e9
        print(f"{name:26} {gbs:8.1f} GB/s  {gbs / base:5.2f} x copy")


if __name__ == "__main__":
    main()

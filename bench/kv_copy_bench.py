"""Gather/scatter GB/s for a Llama-8B-shaped cache (32 layers, 8 KV heads, head 128, bf16, 4096 tokens),
next to a plain copy of the same bytes and torch's per-layer index_select, all in one run (medians).

    python bench/kv_copy_bench.py [--device cuda] [--layout NHD] [--repeats 10]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pd import kv_copy

LAYERS, HEADS, HEAD, BS, TOKENS = 32, 8, 128, 16, 4096


def timed(fn, device: str, repeats: int, inner: int = 20) -> float:
    """Median seconds per call. On a GPU each repeat times `inner` back-to-back calls between CUDA
    events, so launch and synchronisation overhead does not count against sub-millisecond copies."""
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
    ap.add_argument("--layout", default="NHD", choices=["NHD", "HND"])
    ap.add_argument("--block-size", type=int, default=BS)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    dev, bs = torch.device(a.device), a.block_size
    n_blocks = TOKENS // bs
    shape = (2, 2 * n_blocks, bs, HEADS, HEAD) if a.layout == "NHD" else (2, 2 * n_blocks, HEADS, bs, HEAD)
    caches = [torch.randn(shape, device=dev).to(torch.bfloat16) for _ in range(LAYERS)]
    tensors = [half for c in caches for half in (c[0], c[1])]
    blocks = torch.randperm(2 * n_blocks)[:n_blocks].tolist()
    nbytes = sum(t[0].numel() for t in tensors) * 2 * n_blocks
    chunk = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    seg = kv_copy.segments(tensors, a.layout, blocks, 0, TOKENS, bs, HEADS, HEAD, chunk.data_ptr())
    src_flat = torch.empty_like(chunk)
    idx = torch.tensor(blocks, device=dev)

    def torch_gather() -> None:
        off = 0
        for t in tensors:
            n = t[0].numel() * 2 * n_blocks
            torch.index_select(t, 0, idx, out=chunk[off:off + n].view(torch.bfloat16).view(n_blocks, *t.shape[1:]))
            off += n

    if dev.type == "cuda":
        tables = [kv_copy.SegmentTable(seg[:, 0], seg[:, 1], seg[:, 2], dev),
                  kv_copy.SegmentTable(seg[:, 1], seg[:, 0], seg[:, 2], dev)]
        gather, scatter = tables[0].run, tables[1].run
    else:
        def gather() -> None:
            kv_copy.gather(seg, dev)

        def scatter() -> None:
            kv_copy.scatter(seg, dev)

    rows = {
        "copy (same bytes)": timed(lambda: chunk.copy_(src_flat), a.device, a.repeats),
        "gather (csrc)": timed(gather, a.device, a.repeats),
        "scatter (csrc)": timed(scatter, a.device, a.repeats),
        "gather incl. list upload": timed(lambda: kv_copy.gather(seg, dev), a.device, a.repeats),
        "torch index_select per layer": timed(torch_gather, a.device, a.repeats),
    }
    base = nbytes / rows["copy (same bytes)"] / 1e9
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{nbytes / 2**20:.0f} MiB, {len(seg)} segments, layout {a.layout}, block {bs}, device {name}")
    for name, t in rows.items():
        gbs = nbytes / t / 1e9
        print(f"{name:30} {gbs:8.1f} GB/s  {gbs / base:5.2f} x copy")


if __name__ == "__main__":
    main()

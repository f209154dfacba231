"""Where a paged block's bytes lie, as segment tables for csrc's copy (pd/native_copy.py).

vLLM hands the connector one view per layer whose dim 0 is the block and whose strides encode the cache
layout (pd/cache_layout.py). Within a block, one layer's bytes are a few contiguous runs: one when the
block's heads, tokens and content are packed (LBHNC, LBNHC, BLHNC, ...), one per head when heads lie
outside the block (LHBNC, BHLNC). A chunk holds, per layer in order, its blocks one after another, and
each block as its runs in memory order. Two peers whose layouts match therefore lay a chunk out the same
way, and a scatter is a gather with source and destination swapped.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch


def physical_dims(t: torch.Tensor) -> list[int]:
    """Dims of `t` from outermost to innermost in memory (where a size-1 dim falls does not matter)."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


def block_runs(view: torch.Tensor) -> tuple[np.ndarray, int]:
    """(byte offsets of the runs inside one block, bytes per run) for a view whose dim 0 is the block."""
    e = view.element_size()
    inner = [d for d in physical_dims(view[0]) if view[0].shape[d] > 1]
    run, packed = 1, len(inner)
    for d in reversed(inner):  # grow the contiguous tail outward while strides stay dense
        if view[0].stride(d) != run:
            break
        run *= view[0].shape[d]
        packed -= 1
    outer = inner[:packed]
    offsets = [sum(i * view[0].stride(d) for i, d in zip(idx, outer))
               for idx in itertools.product(*(range(view[0].shape[d]) for d in outer))]
    return np.asarray(offsets, dtype=np.uint64) * np.uint64(e), run * e


class BlockRuns:
    """Segment tables for whole blocks of a fixed set of layer views. A paged cache never moves, so the
    base addresses and run offsets are read once; a chunk's table is then a few array operations."""

    def __init__(self, views: list[torch.Tensor]) -> None:
        self.layers = []
        for v in views:
            offsets, run = block_runs(v)
            self.layers.append((np.uint64(v.data_ptr()), np.uint64(v.stride(0) * v.element_size()),
                                offsets, np.uint64(run)))
        self.layer_block_bytes = [int(len(o) * r) for _, _, o, r in self.layers]
        self.block_bytes = sum(self.layer_block_bytes)

    def segments(self, block_ids: list[int], chunk_addr: int, first: int = 0,
                 layers: tuple[int, int] | None = None) -> np.ndarray:
        """Rows (paged address, chunk address, bytes) for a chunk of `block_ids`; only positions from
        `first` on are listed (a scatter that leaves a locally computed prefix alone), and only layers
        `layers[0]` to `layers[1] - 1` when given (one group of a chunk pushed layer by layer)."""
        n = len(block_ids)
        lo, hi = layers or (0, len(self.layers))
        ids = np.asarray(block_ids[first:], dtype=np.uint64)[:, None]
        pos = np.arange(first, n, dtype=np.uint64)[:, None]
        rows, layer_start = [], np.uint64(chunk_addr + n * sum(self.layer_block_bytes[:lo]))
        for (base, stride, offsets, run), lbytes in zip(self.layers[lo:hi], self.layer_block_bytes[lo:hi]):
            src = base + ids * stride + offsets[None, :]
            dst = layer_start + pos * np.uint64(lbytes) + np.arange(len(offsets), dtype=np.uint64)[None, :] * run
            rows.append(np.stack([src.ravel(), dst.ravel(), np.full(src.size, run, dtype=np.uint64)], axis=1))
            layer_start += np.uint64(n * lbytes)
        return np.concatenate(rows) if rows else np.empty((0, 3), dtype=np.uint64)

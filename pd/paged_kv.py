"""Gather paged KV blocks into one contiguous chunk, and scatter a chunk back into blocks.

Every supported cache layout is reduced to a list of *block-major* tensors (dim 0 is the
block id): vLLM CPU `LBHNC` gives one per layer (`[blocks, heads, block_size, 2*head]`),
GPU `NHD`/`HND` give two per layer (K and V of `[2, blocks, ...]`). A chunk is, for each
of those tensors in layer order, the slabs of its blocks one after another. Both peers
agree on the layout in the handshake, so a slab is copied as opaque bytes, by csrc's
segment copy (pd/kv_copy.py) in one call per chunk.
"""
from __future__ import annotations

import re

import torch

from pd import kv_copy
from transfer.layout import KVLayout

_LAYER_INDEX = re.compile(r"(?:layers|h|blocks)\.(\d+)\.")


class LayoutUnsupported(ValueError):
    pass


def _layer_index(name: str) -> int:
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else -1


def block_major_tensors(kv_caches: dict[str, torch.Tensor], cache_layout: str) -> list[torch.Tensor]:
    """Split vLLM's per-layer caches into block-major tensors, in layer order."""
    out = []
    for name in sorted(kv_caches, key=lambda n: (_layer_index(n), n)):
        t = kv_caches[name]
        if cache_layout == "LBHNC":
            out.append(t)
        elif cache_layout in ("NHD", "HND"):
            if t.shape[0] != 2:
                raise LayoutUnsupported(f"{name}: {cache_layout} cache should start with a K/V dim of 2, "
                                        f"got shape {tuple(t.shape)}")
            out.extend([t[0], t[1]])
        else:
            raise LayoutUnsupported(f"cache layout {cache_layout!r} is not supported "
                                    "(known: LBHNC, NHD, HND)")
    return out


class PagedKV:
    """One rank's paged KV cache seen as block slabs; `gather`/`scatter` move whole blocks."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], layout: KVLayout) -> None:
        self.layout = layout
        self.tensors = block_major_tensors(kv_caches, layout.cache_layout)
        self.slabs = kv_copy.BlockSlabs(self.tensors)
        expected, held = layout.bytes_per_block, int(self.slabs.slabs.sum())
        if held != expected:
            raise LayoutUnsupported(f"caches hold {held} bytes per block, layout "
                                    f"{layout.cache_layout} with these fields implies {expected}")

    def chunk_nbytes(self, n_blocks: int) -> int:
        return n_blocks * self.layout.bytes_per_block

    def gather(self, block_ids: list[int], out: torch.Tensor) -> int:
        """Copy the blocks into `out` (uint8, contiguous); returns bytes written."""
        kv_copy.gather(self.slabs.segments(block_ids, out.data_ptr()), out.device)
        return self.chunk_nbytes(len(block_ids))

    def scatter(self, block_ids: list[int], src: torch.Tensor, skip: int = 0) -> None:
        """Copy a chunk from `src` into the blocks; the first `skip` blocks are left alone
        (they already hold locally computed prefix KV)."""
        kv_copy.scatter(self.slabs.segments(block_ids, src.data_ptr(), skip), src.device)

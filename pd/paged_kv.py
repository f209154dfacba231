"""Gather paged KV blocks into one contiguous chunk, and scatter a chunk back into blocks.

The views are vLLM's per-layer caches (pd/cache_layout.py checked them against the stated layout);
a chunk is, for each layer in order, its blocks one after another (pd/kv_copy.py). The copies are
queued on the caller's current stream and not waited for: the caller records a fence after them
(transfer/device_fence.py) and nothing reads the chunk, or frees the slot, before it completes.
"""
from __future__ import annotations

import torch

from pd.block_copy import BlockCopy, block_copy_for
from pd.cache_layout import LayoutUnsupported
from transfer.layout import KVLayout


class PagedKV:
    """One rank's paged KV cache seen as whole blocks; `gather`/`scatter` move them."""

    def __init__(self, views: list[torch.Tensor], layout: KVLayout, copier: BlockCopy | None = None) -> None:
        self.layout = layout
        self.views = views
        self.device = views[0].device
        self.copier = copier or block_copy_for(views, self.device)
        if self.copier.block_bytes != layout.bytes_per_block:
            raise LayoutUnsupported(f"caches hold {self.copier.block_bytes} bytes per block, layout "
                                    f"{layout.cache_layout} with these fields implies {layout.bytes_per_block}")

    def chunk_nbytes(self, n_blocks: int) -> int:
        return n_blocks * self.layout.bytes_per_block

    def gather(self, block_ids: list[int], out: torch.Tensor, layers: tuple[int, int] | None = None) -> int:
        """Queue the copy of the blocks into `out` (uint8, contiguous); returns the bytes the whole chunk
        holds. With `layers`, only those layers' part of the chunk is copied (`layer_span` says where)."""
        self.copier.gather(block_ids, out, layers)
        return self.chunk_nbytes(len(block_ids))

    def layer_span(self, n_blocks: int, layers: tuple[int, int]) -> tuple[int, int]:
        """Byte range that layers `layers[0]` to `layers[1] - 1` take in a chunk of `n_blocks` blocks: a chunk
        holds each layer's blocks one after another, and every layer's blocks are the same size."""
        per_layer = self.layout.bytes_per_block // self.layout.num_layers * n_blocks
        return layers[0] * per_layer, layers[1] * per_layer

    def scatter(self, block_ids: list[int], src: torch.Tensor, skip: int = 0) -> None:
        """Queue the copy of a chunk from `src` into the blocks; the first `skip` blocks are left alone
        (they already hold locally computed prefix KV)."""
        self.copier.scatter(block_ids, src, skip)

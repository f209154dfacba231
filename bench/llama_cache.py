"""Llama-3-8B-shaped paged caches as vLLM lays them out, for the copy and PD benchmarks (no vLLM needed:
GPU nodes run the benchmarks without a GPU build of vLLM)."""
from __future__ import annotations

import torch

from transfer.layout import KVLayout

LAYERS, HEADS, HEAD, BLOCK = 32, 8, 128, 16
# Physical order of the logical [L, B, H, N, C] dims for each layout vLLM names.
ORDER = {"LBHNC": (0, 1, 2, 3, 4), "LBNHC": (0, 1, 3, 2, 4), "LHBNC": (0, 2, 1, 3, 4),
         "BLHNC": (1, 0, 2, 3, 4), "BLNHC": (1, 0, 3, 2, 4), "BHLNC": (1, 2, 0, 3, 4)}


def llama_views(layout: str, n_blocks: int, device: str, layers: int = LAYERS) -> list[torch.Tensor]:
    """Per-layer [blocks, heads, tokens, 2*head] bf16 views over one allocation in `layout`'s memory order."""
    logical = (layers, n_blocks, HEADS, BLOCK, 2 * HEAD)
    order = ORDER[layout]
    phys = torch.zeros([logical[d] for d in order], dtype=torch.bfloat16, device=device)
    five = phys.permute([order.index(d) for d in range(5)])
    return [five[i] for i in range(layers)]


def llama_layout(layout: str, layers: int = LAYERS) -> KVLayout:
    return KVLayout(model_id="llama-3-8b-shaped", num_layers=layers, num_kv_heads=HEADS, kv_heads_per_rank=HEADS,
                    head_size=HEAD, content_size=2 * HEAD, dtype="bfloat16", kv_cache_dtype="bfloat16",
                    block_size=BLOCK, cache_layout=layout)

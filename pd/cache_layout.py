"""The KV layout descriptor, read from what vLLM states rather than guessed from shapes.

vLLM hands the connector one view per layer, logical `[blocks, heads, tokens, content]` for every
attention backend (flash-attn, FlashInfer, Triton, CPU, MLA's single latent cache with one head slot),
and states the physical order of those dims as a named layout (`LBHNC`, `LBNHC`, `LHBNC`, `BLHNC`,
`BLNHC`, `BHLNC`: L = layer, B = block, H = head, N = token, C = content). The descriptor carries that
name, the shape of a block, the element dtype and the exact KV cache dtype (`fp8_e4m3` and `fp8_e5m2`
are both bytes), and the views' strides are checked against the stated name, so a pair that would
read each other's bytes differently is refused at handshake with the field named.
"""
from __future__ import annotations

import os
import re

import torch

from pd.kv_copy import physical_dims
from transfer.layout import KVLayout

_LAYER_INDEX = re.compile(r"(?:layers|h|blocks)\.(\d+)\.")
# Physical order of a per-layer view's dims [B, H, N, C] for each layout vLLM names.
LAYER_VIEW_ORDER = {"LBHNC": (0, 1, 2, 3), "LBNHC": (0, 2, 1, 3), "LHBNC": (1, 0, 2, 3),
                    "BLHNC": (0, 1, 2, 3), "BLNHC": (0, 2, 1, 3), "BHLNC": (0, 1, 2, 3)}


class LayoutUnsupported(ValueError):
    """The caches vLLM handed over cannot be moved as stated; the message names the layer and the fact."""


def _layer_index(name: str) -> int:
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else -1


def layer_names(kv_caches: dict[str, torch.Tensor]) -> list[str]:
    """vLLM's attention layer names in layer order: the order of a chunk's layers."""
    return sorted(kv_caches, key=lambda n: (_layer_index(n), n))


def layer_views(kv_caches: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """vLLM's per-layer views in layer order; each must be `[blocks, heads, tokens, content]`."""
    views = []
    for name in layer_names(kv_caches):
        t = kv_caches[name]
        if t.dim() != 4:
            raise LayoutUnsupported(f"{name}: expected a [blocks, heads, tokens, content] view, got shape "
                                    f"{tuple(t.shape)} (non-attention caches such as Mamba state are not supported)")
        views.append(t)
    return views


def check_strides(views: list[torch.Tensor], cache_layout: str) -> None:
    """Refuse views whose memory order contradicts the layout vLLM stated."""
    if cache_layout not in LAYER_VIEW_ORDER:
        raise LayoutUnsupported(f"cache layout {cache_layout!r} is unknown (known: {', '.join(LAYER_VIEW_ORDER)})")
    want = LAYER_VIEW_ORDER[cache_layout]
    for i, v in enumerate(views):
        have = [d for d in physical_dims(v) if v.shape[d] > 1]
        if have != [d for d in want if v.shape[d] > 1] or v.stride(3) != 1:
            raise LayoutUnsupported(f"layer {i}: vLLM states cache layout {cache_layout}, but the view's strides "
                                    f"{tuple(v.stride())} for shape {tuple(v.shape)} put its dims in memory order "
                                    f"{''.join('BHNC'[d] for d in physical_dims(v))}")


def exact_cache_dtype(cache_dtype: str, element_dtype: torch.dtype) -> str:
    """vLLM's cache dtype with aliases resolved: 'auto' is the element dtype, 'fp8' is 'fp8_e4m3'."""
    if cache_dtype == "auto":
        return str(element_dtype).removeprefix("torch.")
    return "fp8_e4m3" if cache_dtype == "fp8" else cache_dtype


def describe(views: list[torch.Tensor], *, cache_layout: str, block_size: int, cache_dtype: str, kv_scaled: bool,
             model_id: str, num_kv_heads: int, head_size: int, tp_size: int = 1, tp_rank: int = 0,
             weights_fingerprint: str = "") -> KVLayout:
    """The descriptor for these views, after checking they are what vLLM says they are."""
    if not views:
        raise LayoutUnsupported("vLLM handed over no KV cache views")
    check_strides(views, cache_layout)
    first = views[0]
    for i, v in enumerate(views):
        if v.shape[1:] != first.shape[1:] or v.dtype != first.dtype:
            raise LayoutUnsupported(f"layer {i} has shape {tuple(v.shape)} {v.dtype}, layer 0 "
                                    f"{tuple(first.shape)} {first.dtype}: mixed layers are not supported")
    _, heads, tokens, content = first.shape
    if tokens != block_size:
        raise LayoutUnsupported(f"a block holds {tokens} token slots, vLLM's block_size is {block_size} "
                                "(kernel-block splitting and compressed states are not supported)")
    return KVLayout(model_id=model_id, num_layers=len(views), num_kv_heads=num_kv_heads, kv_heads_per_rank=heads,
                    head_size=head_size, content_size=content, dtype=str(first.dtype).removeprefix("torch."),
                    kv_cache_dtype=exact_cache_dtype(cache_dtype, first.dtype), kv_scaled=kv_scaled,
                    block_size=block_size, cache_layout=cache_layout, tp_size=tp_size, tp_rank=tp_rank,
                    weights_fingerprint=weights_fingerprint)


def layout_from_vllm(vllm_config, kv_caches: dict[str, torch.Tensor], model_id: str,
                     weights_fingerprint: str) -> tuple[KVLayout, list[torch.Tensor]]:
    """The descriptor and the layer views of this rank's caches, from vLLM's own statements."""
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
    from vllm.v1.kv_cache_interface import is_quantized_kv_cache

    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    views = layer_views(kv_caches)
    layout = describe(views, cache_layout=cc.get_resolved_kv_cache_layout().name, block_size=cc.block_size,
                      cache_dtype=str(cc.cache_dtype), kv_scaled=is_quantized_kv_cache(str(cc.cache_dtype)),
                      model_id=model_id or os.path.basename(mc.model.rstrip("/")),
                      num_kv_heads=mc.get_total_num_kv_heads(), head_size=mc.get_head_size(),
                      tp_size=pc.tensor_parallel_size, tp_rank=get_tensor_model_parallel_rank(),
                      weights_fingerprint=weights_fingerprint)
    return layout, views

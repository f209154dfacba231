"""csrc gather/scatter (CPU library; the CUDA build is compiled by csrc/build.sh with warnings as errors)."""
from __future__ import annotations

import random
import shutil

import pytest
import torch

from pd import kv_copy
from pd.layout import KVLayout
from pd.paged_kv import PagedKV

BS, HEADS, HEAD = 16, 4, 32
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn]


def make_cache(layout: str, dtype: torch.dtype, n_blocks: int = 24) -> torch.Tensor:
    shape = {"NHD": (2, n_blocks, BS, HEADS, HEAD), "HND": (2, n_blocks, HEADS, BS, HEAD),
             "LBHNC": (n_blocks, HEADS, BS, 2 * HEAD)}[layout]
    return torch.randn(shape).to(dtype)


def tensors_of(cache: torch.Tensor, layout: str) -> list[torch.Tensor]:
    return [cache] if layout == "LBHNC" else [cache[0], cache[1]]


def token_view(t: torch.Tensor, layout: str, block: int, tok: int) -> torch.Tensor:
    """Every value of one token in one block-major tensor (reference indexing, no csrc)."""
    if layout == "NHD":
        return t[block, tok]
    if layout == "HND":
        return t[block, :, tok]
    flat = t[block].reshape(HEADS, -1)  # per head: K of every token, then V of every token
    return torch.cat([flat[:, tok * HEAD:(tok + 1) * HEAD], flat[:, (BS + tok) * HEAD:(BS + tok + 1) * HEAD]], 1)


def test_cpu_library_is_built():
    assert kv_copy._cpu is not None, "run bash csrc/build.sh"
    if shutil.which("nvcc"):
        assert (kv_copy.BUILD / "libkvb_copy_cuda.so").exists(), "nvcc is present but the CUDA library was not built"


@pytest.mark.parametrize("layout", ["NHD", "HND", "LBHNC"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roundtrip_random_blocks_ragged_ranges(layout, dtype):
    rng = random.Random(f"{layout}{dtype}")
    for _ in range(5):
        src = make_cache(layout, dtype)
        blocks = rng.sample(range(24), 8)
        start = rng.randrange(0, 60)
        end = rng.randrange(start + 1, 8 * BS + 1)
        tensors = tensors_of(src, layout)
        nbytes = sum(t[0].numel() for t in tensors) // BS * (end - start) * src.element_size()
        chunk = torch.zeros(nbytes, dtype=torch.uint8)
        seg = kv_copy.segments(tensors, layout, blocks, start, end, BS, HEADS, HEAD, chunk.data_ptr())
        assert int(seg[:, 2].sum()) == nbytes
        kv_copy.gather(seg, chunk.device)
        dst = torch.zeros_like(src)
        dseg = kv_copy.segments(tensors_of(dst, layout), layout, blocks, start, end, BS, HEADS, HEAD,
                                chunk.data_ptr())
        kv_copy.scatter(dseg, chunk.device)
        for t_src, t_dst in zip(tensors, tensors_of(dst, layout)):
            for tok in range(8 * BS):
                b, i = blocks[tok // BS], tok % BS
                got = token_view(t_dst, layout, b, i).view(torch.uint8)
                want = token_view(t_src, layout, b, i).view(torch.uint8)
                assert torch.equal(got, want if start <= tok < end else torch.zeros_like(want)), (tok, start, end)


@pytest.mark.parametrize("layout", ["NHD", "HND", "LBHNC"])
def test_whole_blocks_match_paged_kv_gather(layout):
    cache = make_cache(layout, torch.float16)
    kv_layout = KVLayout(model_id="m", num_layers=1, num_kv_heads=HEADS, kv_heads_per_rank=HEADS, head_size=HEAD,
                         dtype="float16", block_size=BS, cache_layout=layout)
    paged = PagedKV({"model.layers.0.attn": cache}, kv_layout)
    blocks = [5, 2, 17]
    ref = torch.zeros(paged.chunk_nbytes(3), dtype=torch.uint8)
    paged.gather(blocks, ref)
    out = torch.zeros_like(ref)
    kv_copy.gather(kv_copy.segments(paged.tensors, layout, blocks, 0, 3 * BS, BS, HEADS, HEAD, out.data_ptr()),
                   out.device)
    assert torch.equal(out, ref)


def test_nhd_to_hnd_transform():
    src = make_cache("NHD", torch.bfloat16)
    dst = torch.zeros(2, 24, HEADS, BS, HEAD, dtype=torch.bfloat16)
    src_blocks, dst_blocks = [3, 9, 1], [7, 0, 12]
    seg = kv_copy.transform_segments(tensors_of(src, "NHD"), "NHD", tensors_of(dst, "HND"), "HND",
                                     src_blocks, dst_blocks, 40, BS, HEADS, HEAD)
    kv_copy.copy_segments(seg[:, 0], seg[:, 1], seg[:, 2], src.device)
    for t in range(40):
        sb, db, i = src_blocks[t // BS], dst_blocks[t // BS], t % BS
        assert torch.equal(dst[:, db, :, i].view(torch.uint8), src[:, sb, i].view(torch.uint8))

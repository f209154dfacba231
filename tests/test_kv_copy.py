"""csrc gather/scatter. On CPU nodes the C++ library runs; where torch sees a GPU every test also runs
on it with fresh random inputs, checked against the CPU reference (the CUDA build is compiled by
csrc/build.sh with warnings as errors on every node that has nvcc)."""
from __future__ import annotations

import random
import shutil

import pytest
import torch

from pd import kv_copy
from transfer.layout import KVLayout
from pd.paged_kv import PagedKV

BS, HEADS, HEAD = 16, 4, 32
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_cache(layout: str, dtype: torch.dtype, n_blocks: int = 24, device: str = "cpu") -> torch.Tensor:
    shape = {"NHD": (2, n_blocks, BS, HEADS, HEAD), "HND": (2, n_blocks, HEADS, BS, HEAD),
             "LBHNC": (n_blocks, HEADS, BS, 2 * HEAD)}[layout]
    return torch.randn(shape, device=device).to(dtype)


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["NHD", "HND", "LBHNC"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roundtrip_random_blocks_ragged_ranges(layout, dtype, device):
    rng = random.Random(f"{layout}{dtype}{device}")
    for _ in range(5):
        src = make_cache(layout, dtype, device=device)
        blocks = rng.sample(range(24), 8)
        start = rng.randrange(0, 60)
        end = rng.randrange(start + 1, 8 * BS + 1)
        tensors = tensors_of(src, layout)
        nbytes = sum(t[0].numel() for t in tensors) // BS * (end - start) * src.element_size()
        chunk = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        seg = kv_copy.segments(tensors, layout, blocks, start, end, BS, HEADS, HEAD, chunk.data_ptr())
        assert int(seg[:, 2].sum()) == nbytes
        kv_copy.gather(seg, chunk.device)
        dst = torch.zeros_like(src)
        dseg = kv_copy.segments(tensors_of(dst, layout), layout, blocks, start, end, BS, HEADS, HEAD,
                                chunk.data_ptr())
        kv_copy.scatter(dseg, chunk.device)
        if device != "cpu":
            cpu_src = src.cpu()
            ref = torch.zeros(nbytes, dtype=torch.uint8)
            kv_copy.gather(kv_copy.segments(tensors_of(cpu_src, layout), layout, blocks, start, end, BS, HEADS,
                                            HEAD, ref.data_ptr()), ref.device)
            assert torch.equal(chunk.cpu(), ref)
            src, dst = cpu_src, dst.cpu()
            tensors = tensors_of(src, layout)
        for t_src, t_dst in zip(tensors, tensors_of(dst, layout)):
            for tok in range(8 * BS):
                b, i = blocks[tok // BS], tok % BS
                got = token_view(t_dst, layout, b, i).view(torch.uint8)
                want = token_view(t_src, layout, b, i).view(torch.uint8)
                assert torch.equal(got, want if start <= tok < end else torch.zeros_like(want)), (tok, start, end)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["NHD", "HND", "LBHNC"])
def test_paged_kv_whole_blocks_match_torch_indexing(layout, device):
    cache = make_cache(layout, torch.float16, device=device)
    kv_layout = KVLayout(model_id="m", num_layers=1, num_kv_heads=HEADS, kv_heads_per_rank=HEADS, head_size=HEAD,
                         dtype="float16", block_size=BS, cache_layout=layout)
    paged = PagedKV({"model.layers.0.attn": cache}, kv_layout)
    blocks = [5, 2, 17]
    ref = torch.cat([t[blocks].reshape(-1).view(torch.uint8) for t in tensors_of(cache, layout)])
    out = torch.zeros(paged.chunk_nbytes(3), dtype=torch.uint8, device=device)
    assert paged.gather(blocks, out) == out.numel()
    assert torch.equal(out, ref)
    seg = kv_copy.segments(paged.tensors, layout, blocks, 0, 3 * BS, BS, HEADS, HEAD, out.data_ptr())
    assert len(seg) == len(paged.tensors) * len(blocks), "whole-block runs should merge to one segment per slab"
    again = torch.zeros_like(out)
    kv_copy.gather(kv_copy.segments(paged.tensors, layout, blocks, 0, 3 * BS, BS, HEADS, HEAD, again.data_ptr()),
                   out.device)
    assert torch.equal(again, ref)

    dst = PagedKV({"model.layers.0.attn": torch.zeros_like(cache)}, kv_layout)
    before = [t.clone() for t in dst.tensors]
    dst.scatter([9, 4, 11], out, skip=1)
    for t_new, t_old, t_src in zip(dst.tensors, before, tensors_of(cache, layout)):
        assert torch.equal(t_new[[4, 11]].view(torch.uint8), t_src[[2, 17]].view(torch.uint8))
        untouched = [b for b in range(24) if b not in (4, 11)]
        assert torch.equal(t_new[untouched], t_old[untouched]), "skip=1 must leave block 9 and all others alone"


@pytest.mark.parametrize("device", DEVICES)
def test_nhd_to_hnd_transform(device):
    src = make_cache("NHD", torch.bfloat16, device=device)
    dst = torch.zeros(2, 24, HEADS, BS, HEAD, dtype=torch.bfloat16, device=device)
    src_blocks, dst_blocks = [3, 9, 1], [7, 0, 12]
    seg = kv_copy.transform_segments(tensors_of(src, "NHD"), "NHD", tensors_of(dst, "HND"), "HND",
                                     src_blocks, dst_blocks, 40, BS, HEADS, HEAD)
    kv_copy.copy_segments(seg[:, 0], seg[:, 1], seg[:, 2], src.device)
    for t in range(40):
        sb, db, i = src_blocks[t // BS], dst_blocks[t // BS], t % BS
        assert torch.equal(dst[:, db, :, i].view(torch.uint8), src[:, sb, i].view(torch.uint8))

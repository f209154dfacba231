"""Every cache layout vLLM can hand a connector, built with vLLM's own allocator code (the same views,
strides and dtypes a worker receives): the descriptor reads what vLLM states, gather/scatter move the
right bytes through a chunk, csrc and the torch fallback lay chunks out alike, and peers that would read
each other's bytes differently are refused with the field named. Where torch sees a GPU, the CUDA path
is checked against the CPU one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheTensor, MLAAttentionSpec, compute_layout_strides,
                                        create_kv_cache_views)
from vllm.v1.kv_cache_layout import KVCacheLayout

from pd.block_copy import SegmentBlockCopy, TorchBlockCopy
from pd.cache_layout import LayoutUnsupported, describe
from pd.paged_kv import PagedKV

LAYERS, BLOCKS, BS = 3, 12, 16
LAYOUTS = [m.name for m in KVCacheLayout]
SPECS = {
    "gqa-bf16": (lambda: FullAttentionSpec(block_size=BS, num_kv_heads=4, head_size=32, dtype=torch.bfloat16), "auto"),
    "fp8-e5m2": (lambda: FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.uint8), "fp8_e5m2"),
    "mla-576": (lambda: MLAAttentionSpec(block_size=BS, num_kv_heads=1, head_size=576, dtype=torch.bfloat16), "auto"),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def vllm_views(layout: str, spec_name: str, device: str = "cpu", fill: bool = True) -> list[torch.Tensor]:
    """Per-layer views exactly as vLLM's allocate_kv_cache makes them for this layout and spec."""
    spec = SPECS[spec_name][0]()
    kv_layout = KVCacheLayout[layout]
    layer_stride, block_stride, *_ = compute_layout_strides(spec, BLOCKS, LAYERS, kv_layout)
    tensor = KVCacheTensor(size=spec.page_size_bytes * BLOCKS * LAYERS, layers=[f"model.layers.{i}.attn" for i in
                           range(LAYERS)], layer_stride=layer_stride, block_stride=block_stride)
    raw = torch.zeros(tensor.size, dtype=torch.int8, device=device)
    if fill:
        gen = torch.Generator().manual_seed(7)
        raw.copy_(torch.randint(-128, 128, (tensor.size,), dtype=torch.int8, generator=gen))
    return create_kv_cache_views(raw, spec, BLOCKS, kv_layout, tensor)


def descriptor(views, layout: str, spec_name: str):
    spec = SPECS[spec_name][0]()
    return describe(views, cache_layout=layout, block_size=BS, cache_dtype=SPECS[spec_name][1],
                    kv_scaled=SPECS[spec_name][1].startswith("fp8"), model_id="m", num_kv_heads=spec.num_kv_heads,
                    head_size=spec.head_size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_blocks_gathered_on_one_cache_land_in_the_right_blocks_of_another(layout, spec_name, device):
    src = vllm_views(layout, spec_name, device)
    dst = vllm_views(layout, spec_name, device, fill=False)
    desc = descriptor(src, layout, spec_name)
    a, b = PagedKV(src, desc), PagedKV(dst, desc)
    src_ids, dst_ids = [3, 7, 1, 10], [0, 5, 2, 11]
    chunk = torch.zeros(a.chunk_nbytes(len(src_ids)), dtype=torch.uint8, device=device)
    assert a.gather(src_ids, chunk) == chunk.numel() == len(src_ids) * desc.bytes_per_block
    b.scatter(dst_ids, chunk)
    for s, d in zip(src, dst):
        for i, j in zip(src_ids, dst_ids):
            assert torch.equal(d[j].view(torch.uint8), s[i].view(torch.uint8))
        untouched = [k for k in range(BLOCKS) if k not in dst_ids]
        assert not d[untouched].view(torch.uint8).any()


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_fallback_lays_a_chunk_out_like_csrc(layout, spec_name):
    views = vllm_views(layout, spec_name)
    ids = [4, 0, 9]
    fast, slow = SegmentBlockCopy(views, torch.device("cpu")), TorchBlockCopy(views, torch.device("cpu"))
    assert fast.block_bytes == slow.block_bytes
    c1, c2 = (torch.zeros(len(ids) * fast.block_bytes, dtype=torch.uint8) for _ in range(2))
    fast.gather(ids, c1)
    slow.gather(ids, c2)
    assert torch.equal(c1, c2) and c1.any()
    back = vllm_views(layout, spec_name, fill=False)
    TorchBlockCopy(back, torch.device("cpu")).scatter([1, 2, 3], c1, first=1)
    for s, d in zip(views, back):
        assert not d[1].view(torch.uint8).any()  # left alone: a locally computed prefix
        assert torch.equal(d[2].view(torch.uint8), s[0].view(torch.uint8))
        assert torch.equal(d[3].view(torch.uint8), s[9].view(torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the CUDA path with the CPU one")
@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC", "LHBNC", "BLHNC"])
def test_gpu_chunk_equals_cpu_chunk(layout):
    cpu, gpu = vllm_views(layout, "gqa-bf16"), vllm_views(layout, "gqa-bf16", "cuda")
    desc = descriptor(cpu, layout, "gqa-bf16")
    ids = [11, 2, 6, 6 - 1]
    c_cpu = torch.zeros(len(ids) * desc.bytes_per_block, dtype=torch.uint8)
    c_gpu = c_cpu.to("cuda")
    PagedKV(cpu, desc).gather(ids, c_cpu)
    PagedKV(gpu, desc).gather(ids, c_gpu)
    torch.cuda.synchronize()
    assert torch.equal(c_gpu.cpu(), c_cpu)


def test_descriptor_reads_heads_content_and_exact_dtype_from_the_views():
    gqa = descriptor(vllm_views("LBNHC", "gqa-bf16"), "LBNHC", "gqa-bf16")
    assert (gqa.kv_heads_per_rank, gqa.content_size, gqa.dtype, gqa.kv_cache_dtype) == (4, 64, "bfloat16", "bfloat16")
    assert gqa.bytes_per_block == LAYERS * 4 * BS * 64 * 2
    mla = descriptor(vllm_views("LBHNC", "mla-576"), "LBHNC", "mla-576")
    assert (mla.kv_heads_per_rank, mla.content_size) == (1, 576)
    fp8 = descriptor(vllm_views("LBHNC", "fp8-e5m2"), "LBHNC", "fp8-e5m2")
    assert (fp8.dtype, fp8.kv_cache_dtype, fp8.kv_scaled) == ("uint8", "fp8_e5m2", True)


def test_peers_with_other_layout_or_fp8_variant_are_refused_with_the_field_named():
    nhd = descriptor(vllm_views("LBNHC", "gqa-bf16"), "LBNHC", "gqa-bf16")
    hnd = descriptor(vllm_views("LBHNC", "gqa-bf16"), "LBHNC", "gqa-bf16")
    assert nhd.differences(hnd) == ["consumer has cache_layout='LBHNC', producer has cache_layout='LBNHC'"]
    e5m2 = descriptor(vllm_views("LBHNC", "fp8-e5m2"), "LBHNC", "fp8-e5m2")
    e4m3 = e5m2.model_copy(update={"kv_cache_dtype": "fp8_e4m3"})
    assert e4m3.differences(e5m2) == ["consumer has kv_cache_dtype='fp8_e5m2', producer has kv_cache_dtype='fp8_e4m3'"]
    assert any("kv_scaled" in d for d in e5m2.model_copy(update={"kv_scaled": False}).differences(e5m2))


@pytest.mark.parametrize("stated,actual", [("LBHNC", "LBNHC"), ("LBNHC", "LHBNC"), ("LHBNC", "LBHNC")])
def test_views_whose_strides_contradict_the_stated_layout_are_refused(stated, actual):
    with pytest.raises(LayoutUnsupported, match=f"vLLM states cache layout {stated}"):
        descriptor(vllm_views(actual, "gqa-bf16"), stated, "gqa-bf16")


def test_block_runs_count_one_run_per_block_when_packed_and_one_per_head_when_heads_are_outside():
    from pd.kv_copy import block_runs
    packed, per_head = vllm_views("LBNHC", "gqa-bf16")[0], vllm_views("LHBNC", "gqa-bf16")[0]
    assert len(block_runs(packed)[0]) == 1 and block_runs(packed)[1] == 4 * BS * 64 * 2
    offsets, run = block_runs(per_head)
    assert len(offsets) == 4 and run == BS * 64 * 2
    assert np.all(np.diff(offsets.astype(np.int64)) == per_head.stride(1) * 2)

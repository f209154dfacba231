"""Gather/scatter between paged KV and contiguous chunks as one segment-list copy (csrc/).

A segment is (src address, dst address, bytes). For a token range of a request, the segments
walk block-major tensors in layer order, then blocks, then (per layout) heads and K/V runs; the
chunk is those runs back to back. Both peers build the same list from the same layout, so a
scatter is the gather's list with src and dst swapped, and a layout change (NHD <-> HND) is a
list whose two sides use different layouts. Whole-block chunks have the same bytes as
`PagedKV.gather`.

The copy runs in csrc's CUDA kernel for GPU tensors and in its C++ loop on CPU, loaded with
ctypes from build/ (`bash csrc/build.sh`); without the CPU library a ctypes memmove loop does the
same. On a GPU the list must live in device memory: `SegmentTable` copies it there from pageable
host memory (a copy that waits for the current stream) before the one kernel launch.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

BUILD = Path(__file__).resolve().parent.parent / "build"


def _load(name: str) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(BUILD / name))
    except OSError:
        return None


_cpu = _load("libkvb_copy_cpu.so")
_cuda = _load("libkvb_copy_cuda.so") if torch.cuda.is_available() else None


def token_runs(tensor: torch.Tensor, layout: str, block: int, a: int, b: int, block_size: int,
               heads: int, head_size: int) -> list[tuple[int, int]]:
    """(byte offset, bytes) of tokens [a, b) of one block in one block-major tensor."""
    e = tensor.element_size()
    slab = tensor[0].numel() * e
    base = tensor.data_ptr() + block * slab
    n = b - a
    if layout == "NHD":  # [blocks, block_size, heads, head]
        row = heads * head_size * e
        return [(base + a * row, n * row)]
    if layout == "HND":  # [blocks, heads, block_size, head]
        per_head = block_size * head_size * e
        return [(base + h * per_head + a * head_size * e, n * head_size * e) for h in range(heads)]
    if layout == "LBHNC":  # [blocks, heads, block_size, 2*head]: K of all tokens, then V
        per_head = 2 * block_size * head_size * e
        half = block_size * head_size * e
        return [(base + h * per_head + kv * half + a * head_size * e, n * head_size * e)
                for h in range(heads) for kv in (0, 1)]
    raise ValueError(f"unknown cache layout {layout!r}")


def _merged(rows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent runs (the heads of a whole HND block, say) become one longer segment."""
    out: list[list[int]] = []
    for addr, n in rows:
        if out and out[-1][0] + out[-1][1] == addr:
            out[-1][1] += n
        else:
            out.append([addr, n])
    return [(a, n) for a, n in out]


def segments(tensors: list[torch.Tensor], layout: str, block_ids: list[int], start: int, end: int,
             block_size: int, heads: int, head_size: int, chunk_addr: int) -> np.ndarray:
    """Segments (paged address, chunk address, bytes) for tokens [start, end) of a request whose
    blocks are `block_ids`; the chunk begins at `chunk_addr`."""
    rows = []
    for t in tensors:
        for tok in range(start - start % block_size, end, block_size):
            a, b = max(start, tok) - tok, min(end, tok + block_size) - tok
            rows.extend(token_runs(t, layout, block_ids[tok // block_size], a, b, block_size, heads, head_size))
    rows = _merged(rows)
    out = np.empty((len(rows), 3), dtype=np.uint64)
    off = chunk_addr
    for i, (addr, n) in enumerate(rows):
        out[i] = (addr, off, n)
        off += n
    return out


class SegmentTable:
    """A segment list resident in GPU memory, with the kernel's block width chosen for it."""

    def __init__(self, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, device: torch.device) -> None:
        if _cuda is None:
            raise RuntimeError("build/libkvb_copy_cuda.so is missing: run `bash csrc/build.sh` on this node")
        self.table = torch.from_numpy(np.stack([src, dst, nbytes]).astype(np.int64)).to(device)
        self.n = len(nbytes)
        self.device = device
        widest = int(nbytes.max()) if self.n else 0
        self.threads = int(min(512, max(64, 1 << max(0, (widest // 64 - 1).bit_length()))))

    def run(self) -> None:
        stream = torch.cuda.current_stream(self.device).cuda_stream
        rc = _cuda.kvb_copy_segments_cuda(ctypes.c_void_p(self.table.data_ptr()), ctypes.c_int64(self.n),
                                          ctypes.c_int(self.threads), ctypes.c_void_p(stream))
        if rc != 0:
            raise RuntimeError(f"kvb_copy_segments_cuda failed with CUDA error {rc}")


class BlockSlabs:
    """Whole-block segments for a fixed set of block-major tensors (a paged cache never moves,
    so base addresses and slab sizes are read once; a chunk's list is then a few array ops)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.bases = np.array([t.data_ptr() for t in tensors], dtype=np.uint64)[:, None]
        self.slabs = np.array([t.stride(0) * t.element_size() for t in tensors], dtype=np.uint64)[:, None]
        self.prefix = np.concatenate([[0], np.cumsum(self.slabs[:-1, 0])]).astype(np.uint64)[:, None]

    def segments(self, block_ids: list[int], chunk_addr: int, first: int = 0) -> np.ndarray:
        """The chunk holds, per tensor in order, the slabs of `block_ids` back to back; only
        positions from `first` on are listed (a scatter that leaves a computed prefix alone)."""
        n = len(block_ids)
        ids = np.asarray(block_ids[first:], dtype=np.uint64)
        pos = np.arange(first, n, dtype=np.uint64)
        src = self.bases + ids * self.slabs
        dst = np.uint64(chunk_addr) + self.prefix * np.uint64(n) + pos * self.slabs
        return np.stack([src.ravel(), dst.ravel(), np.broadcast_to(self.slabs, src.shape).ravel()], axis=1)


def copy_segments(src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, device: torch.device) -> None:
    n = len(nbytes)
    if device.type == "cuda":
        SegmentTable(src, dst, nbytes, device).run()
        return
    if _cpu is not None:
        ptr = [np.ascontiguousarray(x, dtype=np.uint64) for x in (src, dst, nbytes)]
        _cpu.kvb_copy_segments_cpu(*(p.ctypes.data_as(ctypes.c_void_p) for p in ptr), ctypes.c_int64(n))
        return
    for a, b, k in zip(src.tolist(), dst.tolist(), nbytes.tolist()):
        ctypes.memmove(b, a, k)


def gather(seg: np.ndarray, device: torch.device) -> None:
    copy_segments(seg[:, 0], seg[:, 1], seg[:, 2], device)


def scatter(seg: np.ndarray, device: torch.device) -> None:
    copy_segments(seg[:, 1], seg[:, 0], seg[:, 2], device)


def _row(tensor: torch.Tensor, layout: str, block: int, tok: int, head: int, block_size: int, heads: int,
         head_size: int) -> int:
    """Address of one token's one head (head_size elements) in an NHD or HND block-major tensor."""
    e = tensor.element_size()
    base = tensor.data_ptr() + block * tensor[0].numel() * e
    if layout == "NHD":
        return base + (tok * heads + head) * head_size * e
    if layout == "HND":
        return base + (head * block_size + tok) * head_size * e
    raise ValueError(f"layout transform supports NHD and HND, not {layout!r}")


def transform_segments(src: list[torch.Tensor], src_layout: str, dst: list[torch.Tensor], dst_layout: str,
                       src_blocks: list[int], dst_blocks: list[int], n_tokens: int, block_size: int, heads: int,
                       head_size: int) -> np.ndarray:
    """Segments that copy tokens [0, n_tokens) from one layout straight into another, one row per
    (token, head): for a peer whose GPU backend lays blocks out differently."""
    rows = []
    row_bytes = head_size * src[0].element_size()
    for s, d in zip(src, dst):
        for t in range(n_tokens):
            sb, db, tok = src_blocks[t // block_size], dst_blocks[t // block_size], t % block_size
            for h in range(heads):
                rows.append((_row(s, src_layout, sb, tok, h, block_size, heads, head_size),
                             _row(d, dst_layout, db, tok, h, block_size, heads, head_size), row_bytes))
    return np.array(rows, dtype=np.uint64).reshape(-1, 3)

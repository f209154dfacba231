"""Two ways to move whole blocks between a paged cache and a chunk; both lay the chunk out alike.

`SegmentBlockCopy` is the fast path: one csrc copy per chunk (pd/kv_copy.py builds the table).
`TorchBlockCopy` is the fallback where the CUDA library cannot be had: per layer, an `index_select` /
`index_copy_` on a byte view of the cache with its dims in memory order, so its chunks hold the same bytes
and a peer using either path reads them. `block_copy_for` picks one and says so in the log.

Both queue their work on the caller's current stream and return without waiting for it; the caller
records a fence (transfer/device_fence.py) after them.
"""
from __future__ import annotations

import itertools
import logging
from typing import Protocol

import torch

from pd import native_copy
from pd.kv_copy import BlockRuns, physical_dims

log = logging.getLogger("kvbridge.copy")


class BlockCopy(Protocol):
    block_bytes: int

    def gather(self, block_ids: list[int], out: torch.Tensor, layers: tuple[int, int] | None = None) -> None: ...

    def scatter(self, block_ids: list[int], src: torch.Tensor, first: int = 0) -> None: ...


class SegmentBlockCopy:
    def __init__(self, views: list[torch.Tensor], device: torch.device) -> None:
        self.runs = BlockRuns(views)
        self.block_bytes = self.runs.block_bytes
        self._cuda = native_copy.cuda_copier(device) if device.type == "cuda" else None

    def _run(self, table) -> None:
        if self._cuda is not None:
            self._cuda.run(table)
        else:
            native_copy.copy_cpu(table)

    def _check(self, block_ids: list[int], chunk: torch.Tensor) -> None:
        need = len(block_ids) * self.block_bytes
        if chunk.numel() * chunk.element_size() < need or not chunk.is_contiguous():
            raise ValueError(f"{len(block_ids)} blocks need a contiguous chunk of {need} bytes, "
                             f"got {chunk.numel() * chunk.element_size()}")

    def gather(self, block_ids: list[int], out: torch.Tensor, layers: tuple[int, int] | None = None) -> None:
        self._check(block_ids, out)
        self._run(self.runs.segments(block_ids, out.data_ptr(), layers=layers))

    def scatter(self, block_ids: list[int], src: torch.Tensor, first: int = 0) -> None:
        self._check(block_ids, src)
        self._run(self.runs.segments(block_ids, src.data_ptr(), first)[:, [1, 0, 2]])


class TorchBlockCopy:
    def __init__(self, views: list[torch.Tensor], device: torch.device) -> None:
        self.device = device
        self.bytes_views = []  # per layer: the cache's bytes, dims in memory order, as the widest int that fits
        for v in views:
            b = v.view(torch.uint8)  # the innermost dim is dense in every layout, so this view exists
            b = b.permute(0, *[d + 1 for d in physical_dims(b[0])])
            if b[0].is_contiguous():  # a packed block is one row: faster to index than 4D
                b = b.reshape(b.shape[0], -1)
            # index_select moves elements one by one: 8-byte elements are ~500x faster than bytes on CPU
            wide = next(t for t in (torch.int64, torch.int32, torch.int16, torch.uint8)
                        if b.shape[-1] % t.itemsize == 0 and v.data_ptr() % t.itemsize == 0)
            self.bytes_views.append(b.view(wide))
        self.layer_block_bytes = [b[0].numel() * b.element_size() for b in self.bytes_views]
        self.block_bytes = sum(self.layer_block_bytes)

    def _ids(self, block_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(block_ids, dtype=torch.int64)
        if self.device.type == "cuda":  # pinned + non-blocking: no wait on the engine's stream
            return ids.pin_memory().to(self.device, non_blocking=True)
        return ids

    def _layers(self, chunk: torch.Tensor, n: int):
        start = 0
        for b, lbytes in zip(self.bytes_views, self.layer_block_bytes):
            yield b, chunk[start:start + n * lbytes].view(b.dtype).view(n, *b.shape[1:])
            start += n * lbytes

    def gather(self, block_ids: list[int], out: torch.Tensor, layers: tuple[int, int] | None = None) -> None:
        ids = self._ids(block_ids)
        lo, hi = layers or (0, len(self.bytes_views))
        for b, dst in itertools.islice(self._layers(out, len(block_ids)), lo, hi):
            if dst.device == b.device:
                torch.index_select(b, 0, ids, out=dst)
            else:
                dst.copy_(b.index_select(0, ids), non_blocking=True)

    def scatter(self, block_ids: list[int], src: torch.Tensor, first: int = 0) -> None:
        if first >= len(block_ids):
            return
        ids = self._ids(block_ids[first:])
        for b, part in self._layers(src, len(block_ids)):
            b.index_copy_(0, ids, part[first:].to(b.device, non_blocking=True))


def block_copy_for(views: list[torch.Tensor], device: torch.device) -> BlockCopy:
    """csrc's copy where it runs; else the torch path, with a warning that says how to get the fast one."""
    try:
        return SegmentBlockCopy(views, device)
    except native_copy.NativeUnavailable as e:
        log.warning("kvbridge moves KV with torch index copies (slower): %s", e)
        return TorchBlockCopy(views, device)

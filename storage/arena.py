"""One preallocated byte buffer carved into chunk slots: the memory tier's storage.

A fresh tensor per chunk costs a page fault per 4 KiB on first touch (and an munmap when it is freed),
which held puts to ~0.03 × memcpy; copying into memory that was touched once, at start, runs at memcpy
speed. The buffer is pinned when CUDA is present, so a device-to-host copy into it can be asynchronous
and a load back to the device is one DMA. The allocator is first fit over a sorted free list with
coalescing: chunks of one store are all one size, so fragmentation stays small, and the tier evicts
until a request fits.
"""
from __future__ import annotations

import bisect

import torch

from transfer.host_buffer import pinned_buffer

ALIGN = 64  # cache-line aligned slots: copies in and out run at full speed


def slot_bytes(nbytes: int) -> int:
    """The bytes a range of `nbytes` takes in the arena (aligned, never empty)."""
    return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)


class Arena:
    """Byte ranges of one buffer, handed out and taken back; not thread-safe (the tier locks)."""

    def __init__(self, capacity_bytes: int, pin: bool) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"arena capacity must be positive, got {capacity_bytes}")
        # every page faulted in now (zeroed), not on the engine thread during a put
        self.buffer = pinned_buffer(capacity_bytes) if pin else torch.zeros(capacity_bytes, dtype=torch.uint8)
        self.capacity = capacity_bytes
        self._free: list[tuple[int, int]] = [(0, capacity_bytes)]  # (offset, size), sorted by offset

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a free range of at least `nbytes`, or None when no free range is large enough."""
        need = slot_bytes(nbytes)
        for i, (off, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, size - need)
                return off
        return None

    def free(self, offset: int, nbytes: int) -> None:
        """Give back a range `alloc` returned for `nbytes`; neighbours merge into one range."""
        size = slot_bytes(nbytes)
        i = bisect.bisect_left(self._free, (offset, 0))
        if i < len(self._free) and self._free[i][0] == offset + size:
            size += self._free.pop(i)[1]
        if i > 0 and sum(self._free[i - 1]) == offset:
            offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
            del self._free[i - 1]
            i -= 1
        self._free.insert(i, (offset, size))

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.buffer[offset:offset + nbytes]

    def free_bytes(self) -> int:
        return sum(size for _, size in self._free)

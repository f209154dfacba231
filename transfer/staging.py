"""Producer-side staging: one registered region cut into chunk-sized slots.

A chunk is gathered from paged KV into a staging slot and leaves in one contiguous
write. Slots are few and reused; `acquire` waits a bounded time (no spinning) and
returns None when the region stays full, so the caller can fail the transfer instead
of wedging the engine.
"""
from __future__ import annotations

import threading

import torch

from transfer.nixl_agent import NixlAgent, Region, zeroed_buffer


class StagingBuffer:
    def __init__(self, agent: NixlAgent, num_slots: int, slot_bytes: int, device: str = "cpu") -> None:
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self.region: Region = agent.register(zeroed_buffer(num_slots * slot_bytes, device))
        self._agent = agent
        self._free = list(range(num_slots - 1, -1, -1))
        self._cv = threading.Condition()

    def acquire(self, timeout_s: float) -> int | None:
        with self._cv:
            if not self._cv.wait_for(lambda: self._free, timeout_s):
                return None
            return self._free.pop()

    def release(self, slot: int) -> None:
        with self._cv:
            if slot in self._free:
                raise ValueError(f"staging slot {slot} released twice")
            self._free.append(slot)
            self._cv.notify()

    def view(self, slot: int) -> torch.Tensor:
        return self.region.tensor[slot * self.slot_bytes:(slot + 1) * self.slot_bytes]

    def offset(self, slot: int) -> int:
        return slot * self.slot_bytes

    @property
    def free(self) -> int:
        with self._cv:
            return len(self._free)

    def close(self) -> None:
        self._agent.deregister(self.region)

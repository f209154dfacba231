"""The CPU-memory tier (storage/memory_tier.py): copies, LRU in its budget, and slots a device copy still lands in."""
from __future__ import annotations

import random

import torch

from storage.memory_tier import MemoryTier
from tests.test_store import chunk


def test_memory_tier_roundtrip_capacity_lru():
    tier = MemoryTier(10 * 4096)
    src = chunk()
    assert tier.put("a", src) and torch.equal(tier.get("a"), src)
    src[0] ^= 1
    assert not torch.equal(tier.get("a"), src), "the tier keeps its own copy"
    rng = random.Random(1)
    for i in range(100):
        tier.put(f"k{i}", chunk(rng.choice([1024, 4096, 8192]), i))
        assert tier.used <= tier.capacity
    tier = MemoryTier(3 * 4096)
    for k in "abc":
        tier.put(k, chunk())
    tier.get("a")
    tier.put("d", chunk())
    assert tier.keys() == ["c", "a", "d"], "b was least recently used"
    assert not tier.put("huge", chunk(4 * 4096)) and tier.get("huge") is None


def test_a_chunk_every_lookup_finds_is_not_the_one_evicted():
    """A prefix vLLM keeps in its own cache is looked up by every request and never loaded: it was evicted
    as least recently used while it was the hottest chunk."""
    tier = MemoryTier(3 * 4096)
    for k in "abc":
        tier.put(k, chunk())
    assert tier.contains(["a", "x"]) == [True, False]
    tier.put("d", chunk())
    assert tier.keys() == ["c", "a", "d"], "b was least recently used"


class Landing:
    """A device copy into a slot that has not finished yet (a CUDA event not reached)."""

    def __init__(self) -> None:
        self.landed = False

    def done(self) -> bool:
        return self.landed


def test_a_slot_whose_device_copy_still_runs_is_not_reused_until_it_is_done():
    """Evicted or cleared while its non-blocking copy from the GPU is on its way, its range must not hold another
    chunk: that copy would land in it."""
    tier = MemoryTier(4096)
    slot = tier.put_held("a", chunk(4096, 1))
    slot.fence = copy = Landing()
    tier.release(slot)
    assert not tier.put("b", chunk(4096, 2)), "evicting a copy still landing"
    tier.clear()
    assert not tier.put("b", chunk(4096, 2)), "a cleared slot reused while its copy lands"
    copy.landed = True
    assert tier.put("b", chunk(4096, 2)) and torch.equal(tier.get("b"), chunk(4096, 2))

"""CPU-memory tier: chunk copies in one preallocated arena (pinned when CUDA is present), LRU in its budget.

A put is one copy into a slot of the arena (storage/arena.py), at memcpy speed; from a CUDA tensor the
copy is queued on the current stream into pinned memory (`non_blocking`) and a fence recorded after it,
so the engine thread never waits for the device: the slot is readable once the fence is done. Keys are
content keys, so a put of a key already held only refreshes its place in the LRU.

Readers borrow a slot (`hold` ... `release`): the background writer copies it to disk or Redis, a
load scatters it into the KV cache, both without a copy out. A slot evicted while borrowed goes back to
the arena when its last borrower releases it, so its bytes never change under a reader; one whose device
copy is still running goes back once it is done (else that copy could land in a chunk put there since).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from storage.arena import Arena, slot_bytes
from storage.tier import BYTES_WRITTEN, EVICTIONS, USED_BYTES, count_read, timed
from transfer.device_fence import COMPLETED, Fence, recorder_for


@dataclass
class Slot:
    """A chunk's bytes in the arena; `data` is valid once `fence.done()`."""
    offset: int
    nbytes: int
    data: torch.Tensor
    fence: Fence
    refs: int = 0
    evicted: bool = False


class MemoryTier:
    def __init__(self, capacity_bytes: int, name: str = "memory") -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"memory tier capacity must be positive, got {capacity_bytes}")
        self.name = name
        self.capacity = capacity_bytes
        self.used = 0
        self._arena = Arena(capacity_bytes, pin=torch.cuda.is_available())
        self._items: OrderedDict[str, Slot] = OrderedDict()
        self._landing: list[Slot] = []  # evicted and unborrowed, a device copy still landing in them
        self._lock = threading.Lock()

    def put(self, key: str, data: torch.Tensor) -> bool:
        """Copy `data` in (asynchronously from a CUDA tensor); False if it does not fit beside borrowed slots."""
        slot = self.put_held(key, data)
        if slot is None:
            return False
        self.release(slot)
        return True

    def put_held(self, key: str, data: torch.Tensor) -> Slot | None:
        """Like `put`, and the slot comes back borrowed (the caller releases it), or None if not kept. If another
        thread stored the key during the copy, the slot is its own copy of the bytes, freed on release."""
        src = data.reshape(-1).view(torch.uint8)
        n = src.numel()
        if n > self.capacity:
            return None
        with timed(self.name, "put"):
            with self._lock:
                old = self._items.get(key)
                if old is not None:
                    self._items.move_to_end(key)
                    old.refs += 1
                    return old
                offset = self._make_room(n)
                if offset is None:
                    return None
            slot = Slot(offset, n, self._arena.view(offset, n), COMPLETED, refs=1)
            if src.is_cuda:
                slot.data.copy_(src, non_blocking=True)
                slot.fence = recorder_for(str(src.device))()
            else:
                slot.data.copy_(src)
            with self._lock:
                if key in self._items:  # put or promoted by another thread during our copy: that one is kept
                    slot.evicted = True  # and ours goes back to the arena when the caller releases it
                    return slot
                self._items[key] = slot
                self.used += n
                USED_BYTES.labels(self.name).set(self.used)
        BYTES_WRITTEN.labels(self.name).inc(n)
        return slot

    def reserve(self, nbytes: int) -> Slot | None:
        """A borrowed slot of `nbytes` for the caller to fill, held by nobody until `commit`; None if no room."""
        with self._lock:
            offset = self._make_room(nbytes) if nbytes <= self.capacity else None
        return None if offset is None else Slot(offset, nbytes, self._arena.view(offset, nbytes), COMPLETED, refs=1)

    def commit(self, key: str, slot: Slot) -> None:
        """Hold a reserved slot under `key` (the caller still borrows it); given back if the key came meanwhile."""
        with self._lock:
            if key in self._items:
                slot.evicted = True  # freed when the caller releases it
                return
            self._items[key] = slot
            self.used += slot.nbytes
            USED_BYTES.labels(self.name).set(self.used)
        BYTES_WRITTEN.labels(self.name).inc(slot.nbytes)

    def _make_room(self, n: int) -> int | None:
        """Evict least recently used chunks that nobody borrows until `n` bytes fit in one range (lock
        held); None, evicting nothing, when even that could not free enough (the writer holds the rest)."""
        if self._landing:
            landed = [s for s in self._landing if s.fence.done()]
            self._landing = [s for s in self._landing if not s.fence.done()]
            for s in landed:
                self._arena.free(s.offset, s.nbytes)
        offset = self._arena.alloc(n)
        if offset is not None:
            return offset
        idle = [k for k, s in self._items.items() if s.refs == 0 and s.fence.done()]
        if self._arena.free_bytes() + sum(self._items[k].nbytes for k in idle) < n:
            return None
        for key in idle:
            self._drop(self._items.pop(key))
            EVICTIONS.labels(self.name).inc()
            offset = self._arena.alloc(n)
            if offset is not None:
                break
        return offset

    def _drop(self, slot: Slot) -> None:
        self.used -= slot.nbytes
        USED_BYTES.labels(self.name).set(self.used)
        slot.evicted = True
        if slot.refs == 0:
            self._free_locked(slot)

    def _free_locked(self, slot: Slot) -> None:
        if slot.fence.done():
            self._arena.free(slot.offset, slot.nbytes)
        else:
            self._landing.append(slot)

    def hold(self, key: str) -> Slot | None:
        """Borrow a held chunk whose bytes are ready (a still-running device copy counts as a miss)."""
        with self._lock:
            slot = self._items.get(key)
            if slot is not None and slot.fence.done():
                self._items.move_to_end(key)
                slot.refs += 1
            else:
                slot = None
        count_read(self.name, slot.data if slot is not None else None)
        return slot

    def release(self, slot: Slot) -> None:
        with self._lock:
            slot.refs -= 1
            if slot.refs == 0 and slot.evicted:
                self._free_locked(slot)

    def get(self, key: str) -> torch.Tensor | None:
        """A copy of the chunk's bytes (loads borrow the slot instead, see `hold`)."""
        slot = self.hold(key)
        if slot is None:
            return None
        try:
            return slot.data.clone()
        finally:
            self.release(slot)

    def contains(self, keys: list[str]) -> list[bool]:
        """Which keys are held; a held key counts as used (LRU): a prefix vLLM keeps in its own cache is
        found by every lookup but never loaded, and must not age out of the store while it is that hot."""
        with self._lock:
            held = [k in self._items for k in keys]
            for k, h in zip(keys, held):
                if h:
                    self._items.move_to_end(k)
            return held

    def room_for(self, nbytes: int) -> int:
        """How many chunks of `nbytes` the tier can hold at once: a load needs all of its chunks in memory."""
        return self.capacity // slot_bytes(nbytes)

    def keys(self) -> list[str]:
        """Least recently used first."""
        with self._lock:
            return list(self._items)

    def count(self) -> int:
        return len(self._items)

    def clear(self) -> int:
        """Forget every chunk; a borrowed slot goes back to the arena when its borrower releases it, so a
        load or background write in progress still reads intact bytes. Returns how many were held."""
        with self._lock:
            n = len(self._items)
            for slot in self._items.values():
                self._drop(slot)
            self._items.clear()
        return n

    def close(self) -> None:
        self.clear()

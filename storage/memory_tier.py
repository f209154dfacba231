"""CPU-memory tier: an LRU of chunk copies within a byte budget (pinned when CUDA is present,
so promotion to the GPU is one DMA)."""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from storage.tier import BYTES_WRITTEN, EVICTIONS, USED_BYTES, count_read, timed


class MemoryTier:
    def __init__(self, capacity_bytes: int, name: str = "memory") -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"memory tier capacity must be positive, got {capacity_bytes}")
        self.name = name
        self.capacity = capacity_bytes
        self.used = 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._pin = torch.cuda.is_available()

    def copy_of(self, data: torch.Tensor) -> torch.Tensor:
        """A CPU copy this tier may keep (pinned when CUDA is present)."""
        copy = torch.empty(data.numel() * data.element_size(), dtype=torch.uint8, pin_memory=self._pin)
        copy.copy_(data.reshape(-1).view(torch.uint8))
        return copy

    def put(self, key: str, data: torch.Tensor) -> bool:
        if data.numel() * data.element_size() > self.capacity:
            return False
        with timed(self.name, "put"):
            return self.adopt(key, self.copy_of(data))

    def adopt(self, key: str, copy: torch.Tensor) -> bool:
        """Keep `copy` itself (the caller hands it over and does not write to it again)."""
        n = copy.numel()
        if n > self.capacity:
            return False
        with self._lock:
            old = self._items.pop(key, None)
            self.used -= old.numel() if old is not None else 0
            while self.used + n > self.capacity:
                _, victim = self._items.popitem(last=False)
                self.used -= victim.numel()
                EVICTIONS.labels(self.name).inc()
            self._items[key] = copy
            self.used += n
            USED_BYTES.labels(self.name).set(self.used)
        BYTES_WRITTEN.labels(self.name).inc(n)
        return True

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
        return count_read(self.name, data)

    def contains(self, keys: list[str]) -> list[bool]:
        with self._lock:
            return [k in self._items for k in keys]

    def keys(self) -> list[str]:
        """Least recently used first."""
        with self._lock:
            return list(self._items)

    def close(self) -> None:
        with self._lock:
            self._items.clear()
            self.used = 0

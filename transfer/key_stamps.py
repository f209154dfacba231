"""When each transfer key last showed a sign (a producer alive, the router saying the prefill answered).

Bounded like the memory of ended transfers (ended_keys.py): at most `max_keys`, the stale (older than
`remember_s`), else the oldest, forgotten first, so a flood of transfers cannot grow the consumer's memory.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from transfer.ended_keys import drop_front


class KeyStamps:
    def __init__(self, remember_s: float, max_keys: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.remember_s = remember_s
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._at: dict[str, float] = {}

    def stamp(self, key: str, ago_s: float = 0.0) -> None:
        """`key` showed its sign now, or `ago_s` seconds ago (a sign reported late)."""
        now = self._clock()
        with self._lock:
            self._at.pop(key, None)  # to the end: the dict stays (nearly) in stamp order
            drop_front(self._at, self.max_keys, lambda t: now - t >= self.remember_s)
            self._at[key] = now - ago_s

    def at(self, key: str) -> float:
        """When `key` was last stamped (0 if never, or forgotten)."""
        with self._lock:
            return self._at.get(key, 0.0)

    def forget(self, key: str) -> None:
        with self._lock:
            self._at.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._at)

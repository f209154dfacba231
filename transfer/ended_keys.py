"""The consumer's memory of transfers that ended (failed, cancelled, their request stopped waiting).

Kept for `remember_s` so a request scheduled after the end, or a producer asking late, is answered at
once; at most `max_ended` keys (the expired, else the oldest, are forgotten first), so a flood of cancels
cannot grow the consumer's memory.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from transfer.identity import transfer_id_of


class EndedKeys:
    def __init__(self, remember_s: float, max_ended: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.remember_s = remember_s
        self.max_ended = max_ended
        self._clock = clock
        self._lock = threading.Lock()
        self._ended: dict[str, tuple[str, float]] = {}  # key or transfer id -> (reason, forget at)

    def remember(self, key: str, reason: str) -> None:
        """`key` (a transfer key or a whole transfer id) ended for `reason`; an earlier reason still
        remembered stands."""
        with self._lock:
            now = self._clock()
            old = self._ended.get(key)
            if old is not None and old[1] > now:
                return  # the first reason stands
            self._ended.pop(key, None)
            # Every key is kept remember_s, so insertion order is expiry order: the expired, then (at the bound)
            # the oldest, are at the front. O(1) a call: every delivered transfer is remembered here.
            while self._ended:
                first = next(iter(self._ended))
                if self._ended[first][1] > now and len(self._ended) < self.max_ended:
                    break
                del self._ended[first]
            self._ended[key] = (reason, now + self.remember_s)

    def reason(self, key: str) -> str:
        """Why `key` or its whole transfer ended ('' when it did not, or that was too long ago)."""
        with self._lock:
            now = self._clock()
            for k in (key, transfer_id_of(key)):
                hit = self._ended.get(k)
                if hit is not None and hit[1] > now:
                    return hit[0]
        return ""

    def __len__(self) -> int:
        with self._lock:
            return len(self._ended)

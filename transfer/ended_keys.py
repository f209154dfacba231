"""The consumer's memory of transfers that ended (delivered, failed, cancelled, their request stopped waiting).

Kept for `remember_s` so a request scheduled after the end, or a producer asking late, is answered at
once; at most `max_ended` keys (the expired, else the oldest, are forgotten first), so a flood of cancels
cannot grow the consumer's memory.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

from transfer.identity import transfer_id_of

V = TypeVar("V")


def drop_front(entries: dict[str, V], max_entries: int, expired: Callable[[V], bool]) -> None:
    """Make room for one more entry in `entries`, kept in the order they expire (each for the same time, a key
    given again moved to the end): the expired, then while at the bound the oldest, go from the front. O(1) a
    call, amortised: every delivered transfer and every sign of life passes through here."""
    while entries:
        first = next(iter(entries))
        if not expired(entries[first]) and len(entries) < max_entries:
            return
        del entries[first]


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
            drop_front(self._ended, self.max_ended, lambda v: v[1] <= now)
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

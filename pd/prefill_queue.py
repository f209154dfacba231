"""Push requests still waiting in this prefill's queue, announced to their consumers as signs of life.

A request can wait in the prefill's queue far longer than the decode's `load_timeout_s` (a burst of long
prompts ahead of it). Its decode request would give up and recompute although its KV is coming. So the
scheduler notes each push request as it arrives (vLLM's `on_new_request`), and until the request is
scheduled, each step's metadata names the ones due for an announcement (at once, then every
`every_s`); the worker has them sent as PENDING, which restarts the decode request's timer.
"""
from __future__ import annotations

import time
from typing import Callable


class PrefillQueue:
    def __init__(self, every_s: float = 1.0, max_queued: int = 65536, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.every_s = every_s
        self.max_queued = max_queued
        self._clock = clock
        self._queued: dict[str, tuple[str, str, float]] = {}  # req_id -> (transfer key, consumer, last announced)

    def arrived(self, req_id: str, key: str, consumer: str) -> None:
        if len(self._queued) < self.max_queued:  # beyond that, a request is simply not announced
            self._queued[req_id] = (key, consumer, float("-inf"))

    def __len__(self) -> int:
        return len(self._queued)

    def left(self, req_id: str) -> None:
        """Scheduled (its push begins, and with it the leases and chunks that are its signs of life) or finished."""
        self._queued.pop(req_id, None)

    def due(self) -> list[tuple[str, str]]:
        """(transfer key, consumer) of the queued requests to announce now."""
        now, out = self._clock(), []
        for rid, (key, consumer, last) in self._queued.items():
            if now - last >= self.every_s:
                self._queued[rid] = (key, consumer, now)
                out.append((key, consumer))
        return out

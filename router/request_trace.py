"""Per-request event history for /debug/requests/{id}: what the router did and when, kept for the last
`trace_history` requests."""
from __future__ import annotations

import time
from collections import OrderedDict


class Trace:
    def __init__(self, rid: str, path: str) -> None:
        self.id, self.path, self.t0 = rid, path, time.monotonic()
        self.events: list[tuple[str, str, float]] = []
        self.transfer: tuple[str, str] | None = None  # (decode connector address, transfer id) of the last attempt
        # each attempt's placement decision (router/placement.py), explained (candidates, scores, why) only when
        # /debug/requests asks: explaining every request's candidates was a measurable share of the router's CPU
        self.placement: list = []

    def ms(self) -> float:
        return round((time.monotonic() - self.t0) * 1000, 3)

    def add(self, phase: str, detail: str = "") -> None:
        self.events.append((phase, detail, self.ms()))


class TraceBook:
    """The last `capacity` traces by request id (none kept when capacity is 0)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._traces: OrderedDict[str, Trace] = OrderedDict()

    def new(self, rid: str, path: str) -> Trace:
        trace = Trace(rid, path)
        if self.capacity:
            self._traces[rid] = trace
            while len(self._traces) > self.capacity:
                self._traces.popitem(last=False)
        return trace

    def get(self, rid: str) -> Trace | None:
        return self._traces.get(rid)

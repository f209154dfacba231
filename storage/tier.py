"""What every tier offers, and the per-tier Prometheus metrics.

A tier maps a chunk key to the chunk's bytes (a 1-D uint8 CPU tensor). Tiers never raise
for a miss or for their own trouble (a full disk, a Redis that is down): they count it and
answer "not here", so a store problem costs a recompute, never a request.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from prometheus_client import Counter, Gauge, Histogram

HITS = Counter("kvbridge_store_hits_total", "Chunk reads that found the chunk", ["tier"])
MISSES = Counter("kvbridge_store_misses_total", "Chunk reads that did not", ["tier"])
BYTES_READ = Counter("kvbridge_store_read_bytes_total", "Bytes read from a tier", ["tier"])
BYTES_WRITTEN = Counter("kvbridge_store_written_bytes_total", "Bytes written to a tier", ["tier"])
EVICTIONS = Counter("kvbridge_store_evictions_total", "Chunks evicted to stay within capacity", ["tier"])
ERRORS = Counter("kvbridge_store_errors_total", "Tier operations that failed and were treated as a miss",
                 ["tier", "op"])
REJECTED = Counter("kvbridge_store_rejected_total", "Values at rest that failed their MAC or header check: "
                   "read as misses, never loaded (damage, or a write without the store key)", ["tier"])
USED_BYTES = Gauge("kvbridge_store_used_bytes", "Bytes held by a tier", ["tier"])
LATENCY = Histogram("kvbridge_store_op_seconds", "Tier operation latency", ["tier", "op"],
                    buckets=(1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0))


class Tier(Protocol):
    name: str

    def put(self, key: str, data: torch.Tensor) -> bool:
        """Keep a copy of `data`; False if it was not kept (too big, tier unavailable)."""

    def get(self, key: str) -> torch.Tensor | None:
        """The chunk's bytes, or None."""

    def contains(self, keys: list[str]) -> list[bool]:
        """Which keys are held, without moving their bytes."""

    def clear(self) -> int:
        """Forget every chunk, safely while others read and write; how many were held."""

    def count(self) -> int:
        """Chunks held."""

    def close(self) -> None:
        ...


@contextmanager
def timed(tier: str, op: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        LATENCY.labels(tier, op).observe(time.perf_counter() - t0)


def count_read(tier: str, data: torch.Tensor | None) -> torch.Tensor | None:
    if data is None:
        MISSES.labels(tier).inc()
    else:
        HITS.labels(tier).inc()
        BYTES_READ.labels(tier).inc(data.numel())
    return data

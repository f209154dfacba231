"""Tiers stacked hot to cold behind one store.

put: the memory tier keeps a copy at once; colder tiers are written by one background thread,
so disk fsyncs and Redis round trips never sit on a request's path (a full write queue drops the
cold copy and counts it; the hot copy is kept). get: hot to cold, and a hit in a cold tier is
promoted to the warmer ones. `lookup` answers which leading keys are held anywhere without
moving a byte, which is what the scheduler needs to decide how many tokens to skip.
"""
from __future__ import annotations

import logging
import queue
import threading

import torch
from prometheus_client import Counter

from storage.memory_tier import MemoryTier
from storage.tier import Tier
from transfer.threads import start_io_thread

log = logging.getLogger("kvbridge.store")
DROPPED = Counter("kvbridge_store_dropped_writes_total", "Background writes dropped because the queue was full")
_BATCH = 16


class TieredStore:
    def __init__(self, tiers: list[Tier], write_queue: int = 256) -> None:
        if not tiers:
            raise ValueError("a store needs at least one tier")
        self.tiers = tiers
        self.memory = tiers[0] if isinstance(tiers[0], MemoryTier) else None
        self._cold = tiers[1:] if self.memory else tiers
        self._queue: queue.Queue = queue.Queue(maxsize=write_queue)
        self._writer = start_io_thread(self._write_loop, "kvbridge-store-writer")

    def put(self, key: str, data: torch.Tensor) -> None:
        """Keep a chunk: in memory now, in colder tiers soon. `data` may be reused by the caller."""
        copy = self.memory.copy_of(data) if self.memory else data.reshape(-1).view(torch.uint8).to("cpu", copy=True)
        if self.memory:
            self.memory.adopt(key, copy)
        self._enqueue(key, copy, self._cold)

    def _enqueue(self, key: str, data: torch.Tensor, targets: list[Tier]) -> None:
        if not targets:
            return
        try:
            self._queue.put_nowait((key, data, targets))
        except queue.Full:
            DROPPED.inc()

    def get(self, key: str) -> torch.Tensor | None:
        for i, tier in enumerate(self.tiers):
            data = tier.get(key)
            if data is not None:
                if i > 0:
                    self._promote(key, data, self.tiers[:i])
                return data
        return None

    def _promote(self, key: str, data: torch.Tensor, warmer: list[Tier]) -> None:
        if self.memory is not None and self.memory in warmer:
            self.memory.adopt(key, data)
        self._enqueue(key, data, [t for t in warmer if t is not self.memory])

    def lookup(self, keys: list[str]) -> list[str]:
        """For the longest run of leading keys held somewhere, the name of the hottest tier holding each."""
        where: list[str | None] = [None] * len(keys)
        for tier in self.tiers:
            missing = [i for i, w in enumerate(where) if w is None]
            if not missing:
                break
            for i, held in zip(missing, tier.contains([keys[i] for i in missing])):
                if held:
                    where[i] = tier.name
        out = []
        for w in where:
            if w is None:
                break
            out.append(w)
        return out

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until background writes are done (tests, shutdown); False if they did not finish in time."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        if not self.flush(timeout_s):
            log.warning("store: background writes still queued at close; colder tiers miss them")
        self._queue.put(None)
        self._writer.join(timeout_s)
        for tier in self.tiers:
            tier.close()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            batch = [item]
            while len(batch) < _BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    self._queue.task_done()
                    break
                batch.append(nxt)
            try:
                self._write(batch)
            except Exception:  # a tier bug must not end the writer: later chunks still deserve a copy
                log.exception("store: background write failed")
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _write(self, batch: list[tuple[str, torch.Tensor, list[Tier]]]) -> None:
        for tier in self._cold:
            items = [(k, d) for k, d, targets in batch if tier in targets]
            if hasattr(tier, "put_many"):
                tier.put_many(items)
            else:
                for k, d in items:
                    tier.put(k, d)

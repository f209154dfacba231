"""Tiers stacked hot to cold behind one store.

put: the memory tier keeps a copy at once (one copy into its arena, asynchronous from a GPU); colder
tiers are written by one background thread from that same slot, so disk writes and Redis round trips
never sit on a request's path (a full write queue drops the cold copy and counts it; the hot copy is
kept). load: hot to cold, a hit in a cold tier is promoted to the warmer ones, and a memory hit is
used in place; `prefetch` brings chunks a lookup found in cold tiers into memory ahead of their load.
`lookup` answers which leading keys are held anywhere without moving a byte, which is
what the scheduler needs to decide how many tokens to skip; a remote tier (Redis) that does not
answer within `remote_budget_s` counts as not holding them.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, TypeVar

import torch
from prometheus_client import Counter

from storage.deadline import Deadline
from storage.disk_tier import DiskTier
from storage.memory_tier import MemoryTier, Slot
from storage.prefetcher import Prefetcher
from storage.tier import Tier, timed
from transfer.device_fence import COMPLETED, Fence
from transfer.threads import start_io_thread

log = logging.getLogger("kvbridge.store")
DROPPED = Counter("kvbridge_store_dropped_writes_total", "Background writes dropped because the queue was full")
_BATCH = 16
R = TypeVar("R")


class TieredStore:
    def __init__(self, tiers: list[Tier], write_queue: int = 256, remote_budget_s: float = 0.02,
                 prefetch_wait_s: float = 0.5) -> None:
        if not tiers:
            raise ValueError("a store needs at least one tier")
        self.tiers = tiers
        self.memory = tiers[0] if isinstance(tiers[0], MemoryTier) else None
        self._cold = tiers[1:] if self.memory else tiers
        self._remote = {t.name: Deadline(t.name, remote_budget_s) for t in tiers if getattr(t, "remote", False)}
        self._queue: queue.Queue = queue.Queue(maxsize=write_queue)
        self._writer = start_io_thread(self._write_loop, "kvbridge-store-writer")
        self.prefetch_wait_s = prefetch_wait_s
        self._prefetcher = Prefetcher(self._fetch) if self.memory is not None and self._cold else None

    def put(self, key: str, data: torch.Tensor) -> None:
        """Keep a chunk: in memory now, in colder tiers soon. `data` may be reused by the caller once
        device work queued after this call has run (a CUDA source is copied on its current stream)."""
        with timed("store", "put"):  # the caller's (the engine's) time: what kvbridge_store_op_seconds shows
            slot = self.memory.put_held(key, data) if self.memory else None
            if slot is None:  # no memory tier, or no room beside borrowed slots: the cold tiers get their own copy
                self._enqueue(key, data.reshape(-1).view(torch.uint8).to("cpu", copy=True), COMPLETED, None,
                              self._cold)
            else:
                self._enqueue(key, slot.data, slot.fence, slot, self._cold)

    def _enqueue(self, key: str, data: torch.Tensor, fence: Fence, slot: Slot | None, targets: list[Tier]) -> None:
        if targets:
            try:
                self._queue.put_nowait((key, data, fence, slot, targets))
                return
            except queue.Full:
                DROPPED.inc()
        if slot is not None:
            self.memory.release(slot)

    def load(self, key: str, use: Callable[[torch.Tensor], R], cold: bool = True) -> R | None:
        """`use(bytes)` for a held chunk, hot to cold; a memory hit is used in place (no copy out), a cold
        hit is promoted. None when no tier holds it. A chunk being prefetched is waited for, up to
        `prefetch_wait_s`, rather than read twice. `cold=False` reads memory only and waits for nothing (a
        caller that let the prefetch finish first, on vLLM's engine thread: a chunk still on its way is a
        miss), unless the store has no memory tier: then the cold tiers are all there is."""
        if cold and self._prefetcher is not None:
            self._prefetcher.wait(key, self.prefetch_wait_s)  # a fetch under way ends sooner than a second read
        if self.memory is not None:
            slot = self.memory.hold(key)
            if slot is not None:
                try:
                    return use(slot.data)
                finally:
                    self.memory.release(slot)
        return self._load_cold(key, use) if cold or self.memory is None else None

    def fetching(self, keys: list[str]) -> bool:
        """Whether any of `keys` is still on its way from a cold tier into memory."""
        return self._prefetcher is not None and self._prefetcher.pending(keys)

    def wait_fetched(self, keys: list[str], timeout_s: float) -> None:
        """Until one of `keys`' fetches ends, at most `timeout_s` (at once when none is pending)."""
        if self._prefetcher is not None:
            self._prefetcher.wait_any(keys, timeout_s)

    def prefetch(self, keys: list[str]) -> None:
        """Bring `keys` that only cold tiers hold into memory in the background (a lookup hit them)."""
        if self._prefetcher is not None:
            self._prefetcher.request([k for k, held in zip(keys, self.memory.contains(keys)) if not held])

    def _fetch(self, key: str) -> bool:
        return self._load_cold(key, lambda data: True) is True

    def _load_cold(self, key: str, use: Callable[[torch.Tensor], R]) -> R | None:
        for i, tier in enumerate(self._cold):
            if i == 0 and self.memory is not None and isinstance(tier, DiskTier):
                data, slot = self._load_into_memory(key, tier)
            else:
                data, slot = tier.get(key), None
                if data is not None:
                    self._promote(key, data, self._cold[:i])
            if data is not None:
                try:
                    return use(data)
                finally:
                    if slot is not None:
                        self.memory.release(slot)
        return None

    def _load_into_memory(self, key: str, disk: DiskTier) -> tuple[torch.Tensor | None, Slot | None]:
        """A disk chunk read straight into a memory slot, which promotes it without a copy: (bytes, the
        borrowed slot holding them, or None when no slot could be had and the bytes are a tensor of their own)."""
        reserved: list[Slot] = []

        def into(n: int) -> torch.Tensor | None:
            slot = self.memory.reserve(n)
            if slot is not None:
                reserved.append(slot)
            return slot.data if slot is not None else None
        kept = False
        try:
            data = disk.get(key, into)
            if data is None or not reserved:
                return data, None
            self.memory.commit(key, reserved[0])
            kept = True
            return data, reserved[0]
        finally:
            if not kept:  # the read failed or raised after its slot was reserved: the arena gets the slot back
                for slot in reserved:
                    slot.evicted = True
                    self.memory.release(slot)

    def get(self, key: str) -> torch.Tensor | None:
        """A copy of a held chunk's bytes (tests, tools; the worker loads with `load`)."""
        return self.load(key, lambda data: data.clone())

    def _promote(self, key: str, data: torch.Tensor, warmer_cold: list[Tier]) -> None:
        slot = self.memory.put_held(key, data) if self.memory is not None else None
        self._enqueue(key, data, COMPLETED, slot, warmer_cold)

    def lookup(self, keys: list[str]) -> list[str]:
        """For the longest run of leading keys held somewhere, the name of the hottest tier holding each."""
        where: list[str | None] = [None] * len(keys)
        for tier in self.tiers:
            missing = [i for i, w in enumerate(where) if w is None]
            if not missing:
                break
            asked = [keys[i] for i in missing]
            deadline = self._remote.get(tier.name)
            held = tier.contains(asked) if deadline is None else deadline.call(lambda t=tier: t.contains(asked))
            for i, h in zip(missing, held or ()):
                if h:
                    where[i] = tier.name
        out = []
        for w in where:
            if w is None:
                break
            out.append(w)
        return out

    def report(self) -> dict[str, dict[str, int]]:
        """Per tier: chunks held, bytes used and capacity (0 where the tier's server owns capacity)."""
        return {t.name: {"chunks": t.count(), "used_bytes": int(getattr(t, "used", 0)),
                         "capacity_bytes": int(getattr(t, "capacity", 0))} for t in self.tiers}

    def clear(self, flush_timeout_s: float = 10.0) -> dict[str, int]:
        """Forget every chunk, hot to cold, while requests keep running: background writes queued before the
        call land first (so they are cleared too), a load that already borrowed a chunk finishes with intact
        bytes, and one whose lookup came before the clear finds its chunk gone, a load error its request
        recomputes. Returns the chunks each tier removed."""
        self.flush(flush_timeout_s)
        return {t.name: t.clear() for t in self.tiers}

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until background writes are done (tests, shutdown); False if they did not finish in time."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        if not self.flush(timeout_s):
            log.warning("store: background writes still queued at close; colder tiers miss them")
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._queue.put(None)
        self._writer.join(timeout_s)
        for d in self._remote.values():
            d.close()
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
                for _, _, _, slot, _ in batch:
                    if slot is not None:
                        self.memory.release(slot)
                    self._queue.task_done()

    def _write(self, batch: list[tuple[str, torch.Tensor, Fence, Slot | None, list[Tier]]]) -> None:
        for _, _, fence, _, _ in batch:
            while not fence.done():  # a device-to-host copy still running: it lands within microseconds
                time.sleep(0.0002)
        for tier in self._cold:
            items = [(k, d) for k, d, _, _, targets in batch if tier in targets]
            if hasattr(tier, "put_many"):
                tier.put_many(items)
            else:
                for k, d in items:
                    tier.put(k, d)

"""Chunks a lookup found in a cold tier, brought into memory before the engine asks for them.

The scheduler looks a request up a step or more before the worker loads it. Reading disk or Redis in
that gap, on this thread instead of the engine's, turns the load into a memory hit. A load that comes
while its chunk is still being fetched waits for that fetch (bounded) rather than reading it a second
time; a full queue drops the prefetch and the load reads the chunk itself, as without a prefetcher.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from prometheus_client import Counter

from transfer.threads import start_io_thread

log = logging.getLogger("kvbridge.store")
PREFETCHED = Counter("kvbridge_store_prefetches_total", "Cold chunks fetched into memory ahead of their load",
                     ["outcome"])


class Prefetcher:
    def __init__(self, fetch: Callable[[str], bool], queue_size: int = 256) -> None:
        self._fetch = fetch
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=queue_size)
        self._inflight: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._thread = start_io_thread(self._run, "kvbridge-store-prefetch")

    def request(self, keys: list[str]) -> None:
        """Fetch `keys` into memory in the background, in order; keys already queued are not queued again."""
        for key in keys:
            with self._lock:
                if key in self._inflight:
                    continue
                self._inflight[key] = threading.Event()
            try:
                self._queue.put_nowait(key)
            except queue.Full:
                PREFETCHED.labels("dropped").inc()
                with self._lock:
                    self._inflight.pop(key).set()

    def wait(self, key: str, timeout_s: float) -> None:
        """Until `key`'s fetch (if one is queued or running) is done, at most `timeout_s`."""
        with self._lock:
            ev = self._inflight.get(key)
        if ev is not None:
            ev.wait(timeout_s)

    def pending(self, keys: list[str]) -> bool:
        """Whether any of `keys` is still queued or being fetched."""
        with self._lock:
            return any(k in self._inflight for k in keys)

    def wait_any(self, keys: list[str], timeout_s: float) -> None:
        """Until one of `keys`' fetches is done (or none is pending), at most `timeout_s`."""
        with self._lock:
            events = [self._inflight[k] for k in keys if k in self._inflight]
        if events:
            events[0].wait(timeout_s)   # fetched in order: the first pending one ends first

    def _run(self) -> None:
        while (key := self._queue.get()) is not None:
            try:
                PREFETCHED.labels("fetched" if self._fetch(key) else "missing").inc()
            except Exception:  # a tier bug must not end prefetching; the load reads the chunk itself
                log.exception("store: prefetch of %s failed", key[:12])
            finally:
                with self._lock:
                    self._inflight.pop(key).set()

    def close(self, timeout_s: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)

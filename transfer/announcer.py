"""Tells consumers which transfers wait in this prefill's queue (PENDING), on a thread of its own.

The engine thread only queues an announcement; this thread sends it, so neither the engine nor the
producer's push thread ever waits on a consumer for a message that is only a sign of life. A lost
announcement costs nothing but the sign: the decode request's own timeout still holds.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from transfer.consumer_link import ConsumerLink
from transfer.threads import start_io_thread

log = logging.getLogger("kvbridge.producer")


class Announcer:
    def __init__(self, make_link: Callable[[str], ConsumerLink], max_backlog: int = 4096) -> None:
        """`make_link(address)`: a control connection to that consumer, used for PENDING only."""
        self._make_link = make_link
        self._links: dict[str, ConsumerLink] = {}
        self._backlog: list[tuple[str, str]] = []
        self.max_backlog = max_backlog
        self.dropped = 0
        self._cv = threading.Condition()
        self._stop = False
        self._thread = start_io_thread(self._run, "kvbridge-announcer")

    def announce(self, key: str, consumer: str) -> None:
        """Queue a PENDING for `key` to `consumer` (dropped when the backlog is full: a consumer is down)."""
        with self._cv:
            if len(self._backlog) >= self.max_backlog:
                self.dropped += 1
                return
            self._backlog.append((key, consumer))
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)
        for link in self._links.values():
            link.close()

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stop or self._backlog)
                if self._stop:
                    return
                batch, self._backlog = self._backlog, []
            for key, consumer in batch:
                link = self._links.get(consumer) or self._links.setdefault(consumer, self._make_link(consumer))
                try:
                    link.pending(key)
                except Exception as e:  # a sign of life that does not arrive is only a sign fewer
                    log.info("PENDING for %s to %s not delivered: %s", key, consumer, e)

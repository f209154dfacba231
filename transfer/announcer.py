"""Tells consumers which transfers wait in this prefill's queue (PENDING), each consumer on a thread of its own.

The engine thread only queues an announcement; a consumer's own call thread (link_calls.py) sends it, so
neither the engine nor the producer's push thread ever waits on a consumer for a message that is only a
sign of life, and a consumer that answers late (or not at all) delays only its own signs. A lost
announcement costs nothing but the sign: the decode request's own timeout still holds.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from transfer.consumer_link import ConsumerLink
from transfer.link_calls import LinkCalls

log = logging.getLogger("kvbridge.producer")


class Announcer:
    def __init__(self, make_link: Callable[[str], ConsumerLink], max_backlog: int = 4096) -> None:
        """`make_link(address)`: a control connection to that consumer, used for PENDING only.
        `max_backlog`: announcements queued to all consumers at once; past it they are dropped (counted)."""
        self._calls = LinkCalls(make_link, on_answer=lambda: None)
        self._lock = threading.Lock()
        self._queued = 0
        self.max_backlog = max_backlog
        self.dropped = 0

    def announce(self, key: str, consumer: str) -> None:
        """Queue a PENDING for `key` to `consumer` (dropped when the backlog is full: a consumer is down)."""
        with self._lock:
            if self._queued >= self.max_backlog:
                self.dropped += 1
                return
            self._queued += 1
            self._calls.submit(consumer, lambda link: self._send(link, key))

    def tend(self) -> None:
        """Read the links' connection events, close idle sockets (ConsumerLink.tend)."""
        self._calls.tend()

    def close(self) -> None:
        """Drop the announcements not sent yet (signs of life for requests this producer no longer serves)."""
        self._calls.close(drop_queued=True)

    def _send(self, link: ConsumerLink, key: str) -> None:
        try:
            link.pending(key)
        except Exception as e:  # a sign of life that does not arrive is only a sign fewer
            log.info("PENDING for %s to %s not delivered: %s", key, link.address, e)
        finally:
            with self._lock:
                self._queued -= 1

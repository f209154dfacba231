"""The producer's control calls to its consumers, each consumer's on a thread of its own.

A call (ALLOC, RENEW, PROGRESS, RELEASE) waits for its consumer's answer, up to the RPC timeout. Made on the push
thread, one consumer that answers late (frozen, or starved on a loaded host) held every push to every
other consumer for as long, and their leases and waiting requests ran out meanwhile. So each consumer's
calls run in order on one thread of its own, and the push thread only collects the answers (`Future`s),
waking when one arrives.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

from transfer.consumer_link import ConsumerLink
from transfer.threads import prepare_io_thread

T = TypeVar("T")
log = logging.getLogger("kvbridge.producer")


class LinksClosed(RuntimeError):
    """A call submitted after close() began."""


class LinkCalls:
    def __init__(self, make_link: Callable[[str], ConsumerLink], on_answer: Callable[[], None]) -> None:
        """`make_link(address)` opens the link to a consumer first used; `on_answer()` runs after each call
        ends, on that consumer's thread (it wakes the push thread)."""
        self._make_link = make_link
        self._on_answer = on_answer
        self._links: dict[str, ConsumerLink] = {}
        self._threads: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()  # the push thread, the engine thread and close() all reach the maps
        self._closed = False

    def link(self, consumer: str) -> ConsumerLink:
        with self._lock:
            if consumer not in self._links:
                self._links[consumer] = self._make_link(consumer)
            return self._links[consumer]

    def submit(self, consumer: str, call: Callable[[ConsumerLink], T]) -> Future:
        """Run `call(link)` after the calls already queued for this consumer; its answer or error comes
        back in the future (a LinksClosed error once close() began: nothing is sent then)."""
        link = self.link(consumer)
        with self._lock:
            if self._closed:
                future: Future = Future()
                future.set_exception(LinksClosed(f"not sent to consumer {consumer}: the producer is closing"))
                return future
            if consumer not in self._threads:
                self._threads[consumer] = ThreadPoolExecutor(1, f"kvbridge-link-{consumer}", prepare_io_thread,
                                                                  ("kvbridge-link",))
            future = self._threads[consumer].submit(call, link)
        future.add_done_callback(lambda _: self._on_answer())
        return future

    def tend(self) -> None:
        """Let every link read its connection events and close an idle socket (ConsumerLink.tend), and send the
        withdrawals of its unanswered ALLOCs when due, on its own thread (withdrawals.py)."""
        with self._lock:
            links = list(self._links.items())
        for consumer, link in links:
            link.tend()
            if not link.gone and link.unanswered.claim():
                try:
                    call = self.submit(consumer, lambda lk: lk.unanswered.withdraw_all(lk.withdraw))
                except Exception:  # a thread that cannot start: the push thread calling us goes on
                    log.exception("withdrawals to %s not queued", consumer)
                    link.unanswered.unclaim()
                else:  # a pass cancelled by close(), or never queued, must not leave the next one blocked
                    call.add_done_callback(lambda _, pending=link.unanswered: pending.unclaim())

    def gone(self, consumer: str) -> bool:
        """Whether the consumer closed its connection (ConsumerLink.gone: never waits for a call under way)."""
        link = self._links.get(consumer)
        return link is not None and link.gone

    def close(self, drop_queued: bool = False) -> None:
        """Finish the calls queued (a RELEASE tells a consumer to free slots now; `drop_queued`: only the
        calls under way), then close every link."""
        with self._lock:
            self._closed = True
        for pool in self._threads.values():
            pool.shutdown(wait=True, cancel_futures=drop_queued)
        for link in self._links.values():
            link.close()

"""The router's word that a transfer's prefill node answered (wire.PrefillAnswered), and whether that node may be
one this consumer's connector has not met yet.

A producer asks for slots before its forward, so once its prefill node has answered, a producer not heard from
since cannot reach this node: its request stops waiting after `no_show_s` (pd/worker_side.py). Not on a first
contact: the producer's first ALLOC waits behind its first handshake (a control round trip, each side loading the
other's NIXL metadata), which on two loaded cores outlasted the whole prefill of a short prompt, and the first
routed request between a fresh pair was recomputed while its KV was on its way. The router names the prefill node
with its up-period (router/registry.py: a node back from down, re-added, or seen by a restarted router may be a
new process); an answer from a node this consumer first heard named less than `first_contact_s` before is a first
contact, and its request waits the handshake's grace instead, for its producer's first word and for its KV to
start (pd/worker_side.py). Not covered: a node restarted between two of the router's health checks keeps its name
(its producer's admission then gives the grace only once its handshake is done: producer_registry.py), and so does
a producer this consumer forgot for its silence, which greets it again.

Bounded like the other per-transfer memories (key_stamps.py), and the names too, so a flood cannot grow them.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from transfer.ended_keys import drop_front
from transfer.identity import transfer_id_of


class AnsweredNotices:
    def __init__(self, first_contact_s: float, remember_s: float, max_keys: int, max_nodes: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.first_contact_s = first_contact_s
        self.remember_s = remember_s
        self.max_keys, self.max_nodes = max_keys, max_nodes
        self._clock = clock
        self._lock = threading.Lock()
        self._answered: dict[str, tuple[float, bool]] = {}  # transfer id -> (when answered, on a first contact)
        self._first_named: dict[str, float] = {}  # prefill node (name#up-period) -> its first answer heard of

    def record(self, transfer_id: str, ago_s: float = 0.0, prefill: str = "") -> None:
        """The prefill node `prefill` ('' when the router did not say) answered `transfer_id` `ago_s` seconds ago."""
        now = self._clock()
        at = now - ago_s
        with self._lock:
            first = False
            if prefill:
                named = self._first_named.pop(prefill, None)  # to the end: at the bound the least recently named go
                if named is None:
                    drop_front(self._first_named, self.max_nodes, lambda t: False)
                    named = at
                self._first_named[prefill] = named
                first = at - named < self.first_contact_s
            self._answered.pop(transfer_id, None)  # to the end: the dict stays (nearly) in answer order
            drop_front(self._answered, self.max_keys, lambda v: now - v[0] >= self.remember_s)
            self._answered[transfer_id] = (at, first)

    def at(self, key: str) -> tuple[float, bool]:
        """When the prefill of `key`'s transfer answered (0 if not said, or forgotten), and whether on a first
        contact."""
        with self._lock:
            return self._answered.get(transfer_id_of(key), (0.0, False))

    def __len__(self) -> int:
        with self._lock:
            return len(self._answered)

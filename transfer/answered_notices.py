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

Per transfer, two bounded memories of key_stamps.py (when answered; which answered on a first contact), and the
names bounded too, so a flood cannot grow them.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from transfer.ended_keys import drop_front
from transfer.identity import transfer_id_of
from transfer.key_stamps import KeyStamps


class AnsweredNotices:
    def __init__(self, first_contact_s: float, remember_s: float, max_keys: int, max_nodes: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.first_contact_s = first_contact_s
        self.max_nodes = max_nodes
        self._clock = clock
        self._answered = KeyStamps(remember_s, max_keys, clock)  # transfer id -> when its prefill answered
        self._first_contact = KeyStamps(remember_s, max_keys, clock)  # those of them answered on a first contact
        self._lock = threading.Lock()  # guards the names
        self._first_named: dict[str, float] = {}  # prefill node (name#up-period) -> its first answer heard of

    def record(self, transfer_id: str, ago_s: float = 0.0, prefill: str = "") -> None:
        """The prefill node `prefill` ('' when the router did not say) answered `transfer_id` `ago_s` seconds ago."""
        at = self._clock() - ago_s
        first = False
        if prefill:
            with self._lock:
                named = self._first_named.pop(prefill, None)  # to the end: at the bound the least recently named go
                if named is None:
                    drop_front(self._first_named, self.max_nodes, lambda t: False)
                    named = at
                self._first_named[prefill] = named
            first = at - named < self.first_contact_s
        self._answered.stamp(transfer_id, ago_s)
        if first:
            self._first_contact.stamp(transfer_id, ago_s)
        else:
            self._first_contact.forget(transfer_id)

    def at(self, key: str) -> tuple[float, bool]:
        """When the prefill of `key`'s transfer answered (0 if not said, or forgotten), and whether on a first
        contact."""
        transfer_id = transfer_id_of(key)
        return self._answered.at(transfer_id), self._first_contact.at(transfer_id) > 0

    def __len__(self) -> int:
        return len(self._answered)

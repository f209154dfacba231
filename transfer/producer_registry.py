"""The producers a consumer has met: one entry per producer id (node and rank), bounded.

A producer id names a prefill node's rank; `generation` grows with each start of that producer
(its start time). A HELLO from a newer generation ends the old process's leases and drops its NIXL
agent: that is how a restarted producer is recognised. A HELLO from an older generation under the
same id is refused, so one producer can never end another's leases by reusing a name. The endpoint
lets a HELLO name only the producer id its credential signs for, so with a secret a peer cannot claim
another producer's id either; `owner` maps a lease's incarnation back to that id for the same check on
renew and release.

The table is bounded (`max_producers`, least recently heard first out) and expires: a producer not heard
from for `idle_s` (longer than any lease lives) is forgotten with its NIXL remote agent.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from transfer import wire
from transfer.nixl_agent import NixlAgent
from transfer.slot_pool import SlotPool

log = logging.getLogger("kvbridge.consumer")


@dataclass
class _Producer:
    generation: int
    incarnation: str
    agent_name: str
    last_heard: float
    write_hold_s: float  # how late its writes may land after a cut (write_hold.py): each lease it is granted keeps it
    boot_id: str  # its kernel's: a newer generation from another kernel says nothing of the old one's link


class ProducerRegistry:
    def __init__(self, agent: NixlAgent, pool: SlotPool, max_producers: int = 1024, idle_s: float = 900.0,
                 clock=time.monotonic) -> None:
        self._agent = agent
        self._pool = pool
        self._max = max_producers
        self._idle_s = idle_s
        self._clock = clock
        self._by_id: OrderedDict[str, _Producer] = OrderedDict()  # least recently heard first
        self._incarnations: dict[str, str] = {}  # incarnation -> producer id
        self._last_admitted = float("-inf")  # when a new producer (or a restarted one) was last admitted

    def owner(self, incarnation: str) -> str | None:
        """The producer id that introduced this incarnation, None when none we still know did."""
        return self._incarnations.get(incarnation)

    def _known(self, incarnation: str) -> _Producer | None:
        """The producer entry of an incarnation we still know."""
        p = self._by_id.get(self._incarnations.get(incarnation, ""))
        return p if p is not None and p.incarnation == incarnation else None

    def write_hold_of(self, incarnation: str) -> float:
        """How long past a lease's deadline that producer incarnation's writes may still land (0 if unknown)."""
        p = self._known(incarnation)
        return p.write_hold_s if p is not None else 0.0

    def agent_of(self, incarnation: str) -> str | None:
        """The NIXL agent name of a producer incarnation we still know (its fences must come from it)."""
        p = self._known(incarnation)
        return p.agent_name if p is not None else None

    def __len__(self) -> int:
        return len(self._by_id)

    def touch(self, producer_id: str) -> None:
        """The producer was heard from: it stays; those silent past `idle_s` are forgotten."""
        now = self._clock()
        p = self._by_id.get(producer_id)
        if p is not None:
            p.last_heard = now
            self._by_id.move_to_end(producer_id)
        while self._by_id:
            oldest_id, oldest = next(iter(self._by_id.items()))
            if now - oldest.last_heard <= self._idle_s:
                break
            log.info("producer %s silent for %.0fs: forgotten", oldest_id, now - oldest.last_heard)
            self._forget(oldest_id)

    def hello(self, msg: wire.Hello, write_hold_s: float = 0.0) -> str:
        """Admit the producer ('' ) or say why not; `write_hold_s` as the consumer reckons it for this producer."""
        old = self._by_id.get(msg.producer_id)
        if old is not None and old.incarnation == msg.incarnation:  # the same hello again: the same hold
            self._by_id.move_to_end(msg.producer_id)
            return ""
        if old is not None:
            if msg.generation <= old.generation:
                return (f"producer {msg.producer_id} generation {msg.generation} is not newer than the live "
                        f"generation {old.generation}: two producers share this id (set distinct instance_id)")
            here = old.boot_id == msg.boot_id  # else its old leases rest as unanswered ones (write_hold.py)
            n = self._forget(msg.producer_id, restarted=here)
            log.info("producer %s restarted%s (generation %d -> %d): dropped its old agent, ended %d leases",
                     msg.producer_id, "" if here else " on another host", old.generation, msg.generation, n)
        while len(self._by_id) >= self._max:
            self._forget(next(iter(self._by_id)))
        self._by_id[msg.producer_id] = _Producer(msg.generation, msg.incarnation,
                                                 self._agent.add_remote(msg.agent_meta), self._clock(), write_hold_s,
                                                 msg.boot_id)
        self._incarnations[msg.incarnation] = msg.producer_id
        self._last_admitted = self._clock()
        return ""

    def no_show_s(self, quiet_s: float, handshake_s: float) -> float:
        """How long a transfer whose prefill node has answered may stay unheard of: `quiet_s`, or `handshake_s`
        (if longer) while a producer admitted less than `handshake_s` ago may still be finishing its handshake —
        its ALLOCs, sent before the forward, go out only once the handshake is done."""
        return max(quiet_s, handshake_s) if self._clock() - self._last_admitted < handshake_s else quiet_s

    def _forget(self, producer_id: str, restarted: bool = False) -> int:
        """Drop a producer; `restarted`: a newer generation of it said hello, so the old process is gone (one
        forgotten for silence may only be cut off, its writes still on the way: quarantine.py)."""
        p = self._by_id.pop(producer_id)
        self._incarnations.pop(p.incarnation, None)
        self._agent.remove_remote(p.agent_name)
        return self._pool.release_producer(p.incarnation, restarted)

"""The producers a consumer has met: one entry per producer id (node and rank), bounded.

A producer id names a prefill node's rank; `generation` grows with each start of that producer
(its start time). A HELLO from a newer generation ends the old process's leases and drops its NIXL
agent: that is how a restarted producer is recognised. A HELLO from an older generation under the
same id is refused, so one producer can never end another's leases by reusing a name.
"""
from __future__ import annotations

import logging
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


class ProducerRegistry:
    def __init__(self, agent: NixlAgent, pool: SlotPool, max_producers: int = 1024) -> None:
        self._agent = agent
        self._pool = pool
        self._max = max_producers
        self._by_id: OrderedDict[str, _Producer] = OrderedDict()
        self._incarnations: set[str] = set()

    def known(self, incarnation: str) -> bool:
        return incarnation in self._incarnations

    def hello(self, msg: wire.Hello) -> str:
        """Admit the producer ('' ) or say why not."""
        old = self._by_id.get(msg.producer_id)
        if old is not None and old.incarnation == msg.incarnation:
            self._by_id.move_to_end(msg.producer_id)
            return ""
        if old is not None:
            if msg.generation <= old.generation:
                return (f"producer {msg.producer_id} generation {msg.generation} is not newer than the live "
                        f"generation {old.generation}: two producers share this id (set distinct instance_id)")
            n = self._forget(msg.producer_id)
            log.info("producer %s restarted (generation %d -> %d): dropped its old agent, ended %d leases",
                     msg.producer_id, old.generation, msg.generation, n)
        while len(self._by_id) >= self._max:
            self._forget(next(iter(self._by_id)))
        self._by_id[msg.producer_id] = _Producer(msg.generation, msg.incarnation,
                                                 self._agent.add_remote(msg.agent_meta))
        self._incarnations.add(msg.incarnation)
        return ""

    def _forget(self, producer_id: str) -> int:
        p = self._by_id.pop(producer_id)
        self._incarnations.discard(p.incarnation)
        self._agent.remove_remote(p.agent_name)
        return self._pool.release_producer(p.incarnation)

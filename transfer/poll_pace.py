"""How soon the consumer endpoint's thread looks at the wire again: the one decision its loop makes.

A producer's write completes only as that thread drives NIXL, and its chunk notice is seen only then, so
looking more often delivers sooner; but the thread shares the decode worker's interpreter (and, on a small
host, the cores) with the engine, so every look costs running requests something. Hence a pace per
situation (consumer_settings.py says what each one measured):
- a scatter still settling (a device copy reading a slot): look every busy_poll_s;
- chunks streaming: every stream_poll_s, for spin_s after the last notice, and for idle_spin_s after it while
  the engine sits idle waiting (`wait_arrivals`) for the rest of a transfer already under way;
- a lease waiting for chunks otherwise: every lease_poll_s (a whole prefill forward may come first);
- nothing received: every idle_poll_s.
"""
from __future__ import annotations

from typing import Callable

from transfer.consumer_settings import ConsumerSettings


def streaming(cfg: ConsumerSettings, now: float, noticed: float, awaited_until: float, receiving: bool,
              under_way: Callable[[], bool]) -> bool:
    """Whether to look every stream_poll_s: `noticed` is when the last chunk notice came, `awaited_until` how
    long the engine said it waits idle; `under_way` (asked last: it takes the pool's lock) whether a lease took
    chunks and waits for more."""
    if not receiving:
        return False
    if now < noticed + cfg.spin_s:
        return True
    return now < awaited_until and now < noticed + cfg.idle_spin_s and under_way()


def poll_timeout_ms(cfg: ConsumerSettings, settling: bool, streaming_now: bool, receiving: bool) -> float:
    """How long the loop's ZMQ poll may wait for a control frame (0: look, then sleep the pace's interval)."""
    if settling or streaming_now:
        return 0
    return cfg.lease_poll_s * 1000 if receiving else cfg.idle_poll_s * 1000

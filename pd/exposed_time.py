"""Exposed transfer time: how long a decode request waited for its KV after the prefill's last forward ended.

The clock starts when the producer stages the request's last chunk (right after the forward that computed
it; with layer-wise push, when its last group of layers is handed over, at the forward's last attention layer,
so the rest of that forward, the prefill's answer and, when the router sends the decode leg after it, that
leg's arrival count as exposed too: compare TTFT, not this figure, across the two; the chunk notice carries that
wall-clock time)
and stops when the decode worker has scattered the KV and
reports the request as received, i.e. when vLLM may schedule it. It spans the gather, the push thread, the
write, the consumer's notification pump and the decode's wait loop: the part of a PD transfer that the
request sees, however long the pushes that overlapped the prefill took. Across hosts the figure is as good
as the agreement of their clocks; a negative difference (clock skew) counts as zero.
"""
from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import Histogram

from transfer.notice import ChunkNotice

EXPOSED_SECONDS = Histogram(
    "kvbridge_exposed_transfer_seconds",
    "Per received request: from the end of the prefill's last forward to the moment the decode may schedule it",
    buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))


def observe_exposed(notices: Iterable[ChunkNotice], now: float | None = None) -> float | None:
    """Record one request's exposed time from the notices of the chunks it received; returns it in seconds.
    None (nothing recorded) when no notice says when its KV was ready (a producer that does not stamp)."""
    stamps = [n.kv_ready_at for n in notices if n.kv_ready_at is not None]
    if not stamps:
        return None
    exposed = max(0.0, (time.time() if now is None else now) - max(stamps))
    EXPOSED_SECONDS.observe(exposed)
    return exposed

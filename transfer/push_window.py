"""The producer's side of a windowed lease: asking the consumer how far it may write.

A grant with fewer offsets than chunks is a window (transfer/lease_desk.py): lease chunk i goes to
offsets[i % W] and may be written only once the consumer has scattered chunk i - W. The push thread
asks (`Progress`, which also renews the lease) only while a staged chunk waits beyond the open window,
and at most every `ASK_EVERY_S`.
"""
from __future__ import annotations

import threading

from transfer.consumer_link import ConsumerLink, PeerUnreachable
from transfer.push_job import PushJob

ASK_EVERY_S = 0.002


def widen_window(job: PushJob, link: ConsumerLink, staged_lock: threading.Condition, now: float, ttl_s: float,
                 margin_s: float) -> str:
    """Learn how far `job` may write when chunks beyond its open window are staged (`staged_lock` guards
    `job.staged`); '' or why the transfer fails (the consumer dropped the lease or did not answer)."""
    if now < job.window_ask_at:
        return ""
    with staged_lock:
        if all(job.may_write(c) for c in job.staged):
            return ""
    job.window_ask_at = now + ASK_EVERY_S
    try:
        state = link.progress(job.spec.key, job.grant.epoch, ttl_s)
    except Exception as e:
        job.peer_down = isinstance(e, PeerUnreachable)
        return f"window query failed: {e}"
    if not state.ok:
        return "window query failed: the consumer no longer holds the lease"
    job.writable = max(job.writable, state.writable)
    job.deadline = now + ttl_s - margin_s
    job.next_renew = now + ttl_s / 3
    return ""

"""The producer's side of a windowed lease: asking the consumer how far it may write.

A grant with fewer offsets than chunks is a window (transfer/lease_desk.py): lease chunk i goes to
offsets[i % W] and may be written only once the consumer has scattered chunk i - W. The push thread
asks (`Progress`, which also renews the lease) only while a staged chunk waits beyond the open window,
and at most every `ASK_EVERY_S`. The question runs on the consumer's link thread like every other call
(transfer/link_calls.py); `window_answered` applies the answer when it comes.
"""
from __future__ import annotations

import threading

from transfer import wire
from transfer.push_job import PushJob

ASK_EVERY_S = 0.002


def window_blocked(job: PushJob, staged_lock: threading.Condition, now: float) -> bool:
    """Whether to ask now: a staged chunk waits beyond the open window and the last ask is old enough
    (`staged_lock` guards `job.staged`)."""
    if now < job.window_ask_at:
        return False
    with staged_lock:
        if all(job.may_write(c) for c, sc in job.staged.items() if sc.parts or sc.whole):  # not ones still empty
            return False
    job.window_ask_at = now + ASK_EVERY_S
    return True


def window_answered(job: PushJob, state: wire.WindowState, sent_at: float, ttl_s: float, margin_s: float) -> str:
    """Open the window as far as the consumer says (the answer renewed the lease); '' or why the
    transfer fails."""
    if not state.ok:
        return "window query failed: the consumer no longer holds the lease"
    job.writable = max(job.writable, state.writable)
    job.deadline = sent_at + ttl_s - margin_s
    job.next_renew = sent_at + ttl_s / 3
    return ""

"""What the producer makes of a consumer's answer to one of its control calls.

The calls run on each consumer's own thread (link_calls.py); the push thread collects a finished
call's future on its next pass over the job and applies it here: a lease (or none free yet), a
renewal, a window's progress (push_window.py), or a release's outcome (only logged).
"""
from __future__ import annotations

import logging
import time

from transfer import wire
from transfer.consumer_link import PeerError, PeerUnreachable
from transfer.producer_settings import ProducerSettings
from transfer.push_job import PushJob
from transfer.push_window import window_answered
from transfer.states import State

log = logging.getLogger("kvbridge.producer")
FAILED_CALL = {"renew": "renewal failed: ", "progress": "window query failed: "}


def answered(job: PushJob, kind: str, sent_at: float, cfg: ProducerSettings) -> None:
    """Apply the answer of `job`'s finished call `kind` (asked at `sent_at`) and clear the call."""
    t, call, job.call = job.t, job.call, None
    try:
        reply = call.result()
    except Exception as e:
        if kind == "release":
            log.info("release of %s on %s not confirmed (%s); the lease will expire", t.transfer_id,
                     job.consumer, e)
            return
        if kind == "alloc" and isinstance(e, PeerError) and e.code == wire.LEASE_IN_USE:
            # An earlier push of this key and attempt already wrote into the lease: ended, not failed, so no
            # release with a reason fails the transfer that push delivered.
            t.to(State.ABORTED, f"not pushed again: {e}")
            return
        job.peer_down = isinstance(e, PeerUnreachable)
        if not t.done:
            t.to(State.FAILED, f"{FAILED_CALL.get(kind, '')}{e}")
        return
    if kind == "alloc" and isinstance(reply, wire.NoCapacity):
        now = time.monotonic()
        if not t.done and now - t.times[State.ALLOCATING.value] > cfg.alloc_timeout_s:
            t.to(State.FAILED, f"consumer {job.consumer} had no free slots for {cfg.alloc_timeout_s}s")
        job.retry_at = now + reply.retry_after_s
    elif kind == "alloc":
        job.grant = reply  # also when the transfer ended meanwhile: its release names this lease
        job.deadline, job.next_renew = sent_at + reply.ttl_s - cfg.write_margin_s, sent_at + reply.ttl_s / 3
        if not t.done:
            t.to(State.SENDING)
    elif kind == "progress" and not t.done:
        why = window_answered(job, reply, sent_at, cfg.lease_ttl_s, cfg.write_margin_s)
        if why:
            t.to(State.FAILED, why)
    elif kind == "renew" and not t.done:
        if not reply:
            t.to(State.FAILED, "renewal failed: consumer no longer holds the lease")
        job.deadline, job.next_renew = sent_at + cfg.lease_ttl_s - cfg.write_margin_s, sent_at + cfg.lease_ttl_s / 3

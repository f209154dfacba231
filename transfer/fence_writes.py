"""The producer's lease fences (notice.py), posted and driven on the push thread.

A fence is the notification of a 1-byte WRITE into the bytes a consumer registers after its last slot. NIXL
posts a write's notification only once the connection to that consumer is flushed (every write posted to it
before has landed, on whichever lanes UCX spread them over), so the consumer reads the fence after any byte of
the lease that a cut link still held, and may then reuse its slots. Until the link carries them, the write and
its notification wait in UCX, which moves only when driven: `poll` drives them until done, for up to
`PATIENCE_S` (a consumer stops waiting for a fence after its own `fence_timeout_s`, or after the longer hold a
producer's TCP may have: quarantine.py).
"""
from __future__ import annotations

import logging
import time

from transfer import wire
from transfer.nixl_agent import NixlAgent, TransferError
from transfer.notice import LeaseFence
from transfer.push_job import PushJob
from transfer.staging import StagingBuffer

log = logging.getLogger("kvbridge.producer")
PATIENCE_S = 600.0


class FenceWrites:
    def __init__(self, agent: NixlAgent, staging: StagingBuffer, incarnation: str) -> None:
        self._agent, self._staging, self._incarnation = agent, staging, incarnation
        self._pending: list[tuple[object, float, str]] = []  # (write handle, posted at, transfer key)

    def send(self, job: PushJob, w: wire.Welcome | None) -> None:
        """Fence `job`'s lease after every write posted to its consumer. Not to a consumer that restarted since
        the grant: the old lease died with it."""
        if w is None or w.incarnation != job.grant.incarnation:
            return
        fence = LeaseFence(transfer_id=job.spec.key, epoch=job.grant.epoch, incarnation=self._incarnation)
        after_slots = w.region_addr + w.num_slots * w.slot_bytes
        try:
            handle = self._agent.write(self._staging.region, [(0, after_slots, 1)], w.agent_name, w.mem_type,
                                       w.dev_id, fence.encode())
        except TransferError as e:  # a consumer we cannot reach: its lease rests as an unanswered one
            log.info("fence for %s to %s not sent: %s", job.spec.key, job.consumer, e)
            return
        self._pending.append((handle, time.monotonic(), job.spec.key))

    def poll(self, now: float) -> int:
        """Drive the fences still on their way; release those done, failed, or past `PATIENCE_S`. Returns how
        many are still on their way."""
        kept = []
        for handle, posted, key in self._pending:
            state = self._agent.poll(handle)
            if state == "PROC" and now - posted < PATIENCE_S:
                kept.append((handle, posted, key))
                continue
            if state != "DONE":
                log.info("fence for %s: %s after %.0f s", key, "gave up" if state == "PROC" else "failed",
                         now - posted)
            try:
                self._agent.release(handle)
            except Exception as e:  # a handle to a dead peer may refuse release
                log.info("release of the fence write for %s failed: %s", key, e)
        self._pending = kept
        return len(kept)

    def flush(self, timeout_s: float) -> None:
        """At shutdown: drive the fences still on their way for up to `timeout_s` (a consumer that never gets
        one rests the lease's slots as an unanswered lease's, quarantine.py)."""
        end = time.monotonic() + timeout_s
        while self.poll(time.monotonic()) and time.monotonic() < end:
            time.sleep(0.01)

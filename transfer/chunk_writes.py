"""The producer's writes of a transfer's staged chunks: posted, polled, released (staged_chunk.py says in what order).

Runs on the push thread only. Each chunk is written in the ranges the engine thread handed over; its notice
goes with the last range, after the others completed, and its staging slot is free once that write completed.
"""
from __future__ import annotations

import logging
import threading
import zlib

from transfer import wire
from transfer.geometry import ChunkGeometry
from transfer.nixl_agent import NixlAgent, TransferError
from transfer.notice import ChunkNotice
from transfer.push_job import PushJob
from transfer.staged_chunk import StagedChunk
from transfer.staging import StagingBuffer
from transfer.states import PUSHED_BYTES, State

log = logging.getLogger("kvbridge.producer")


class ChunkWrites:
    def __init__(self, agent: NixlAgent, staging: StagingBuffer, geometry: ChunkGeometry, incarnation: str,
                 checksum: bool, staged_lock: threading.Condition) -> None:
        self._agent, self._staging, self._geometry = agent, staging, geometry
        self._incarnation, self._checksum = incarnation, checksum
        self._lock = staged_lock  # guards each job's `staged`, which the engine thread adds to

    def post(self, job: PushJob, w: wire.Welcome, chunk: int, sc: StagedChunk, ranges: list[tuple[int, int]],
               due: tuple[int, int] | None) -> bool:
        """Post the writes of `ranges` and, when `due`, the chunk's last range with its notice. False when the
        transfer failed instead."""
        skip = job.grant.skip_chunks
        want = self._geometry.chunk_nbytes(job.spec.num_tokens, chunk)
        end = max(end for _, end in ranges + [due or (0, 0)])
        if end > min(want, w.slot_bytes) or (due and sc.nbytes != want):
            held = f"holds {sc.nbytes} bytes" if due else f"has bytes up to {end}"
            job.t.to(State.FAILED, f"chunk {chunk} {held}, it must hold {want} (slot {w.slot_bytes})")
            return False
        if w.incarnation != job.grant.incarnation:  # its slots may be another transfer's now
            job.t.to(State.FAILED, f"consumer {job.consumer} restarted (incarnation {job.grant.incarnation[:12]} "
                     f"-> {w.incarnation[:12]}) after granting the lease")
            return False
        dst = job.grant.offsets[(chunk - skip) % len(job.grant.offsets)]  # a window reuses its slots
        writes = [(r, b"") for r in ranges]
        if due is not None:
            data = self._staging.view(sc.slot)[:sc.nbytes]
            notice = ChunkNotice(transfer_id=job.spec.key, chunk=chunk - skip, epoch=job.grant.epoch,
                                 incarnation=self._incarnation, nbytes=sc.nbytes,
                                 crc=zlib.crc32(data.cpu().numpy()) if self._checksum else None,
                                 kv_ready_at=sc.kv_ready_at)
            writes.append((due, notice.encode()))
        base = self._staging.offset(sc.slot)
        for (start, end), notif in writes:
            try:
                handle = self._agent.write(self._staging.region, [(base + start, dst + start, end - start)],
                                          w.agent_name, w.mem_type, w.dev_id, notif)
            except TransferError as e:
                job.peer_down = e.peer_gone  # NIXL saw the consumer die: its lease went with it
                job.t.to(State.FAILED, str(e))
                return False
            sc.writing.append(handle)
            PUSHED_BYTES.inc(end - start)
        return True

    def poll(self, job: PushJob, stuck: bool) -> None:
        """Drive the job's writes; a chunk whose notice-bearing write completed is sent and its slot free.
        `stuck`: the lease is past its deadline, so writes still in flight count as failed."""
        for chunk, sc in list(job.staged.items()):
            for handle in list(sc.writing):
                state = "ERR" if stuck else self._agent.poll(handle)
                if state == "PROC":
                    continue
                self._release(job, handle)
                sc.writing.remove(handle)
                if state != "DONE":
                    job.abandoned = True  # what it had not delivered may still land
                    job.t.to(State.FAILED, f"write of chunk {chunk} to {job.consumer} failed")
            if sc.announced and not sc.writing:
                with self._lock:
                    del job.staged[chunk]
                self._staging.release(sc.slot)
                job.sent += 1

    def drop(self, job: PushJob) -> None:
        """Release every write still in flight (a failed job: their bytes go nowhere anyone reads)."""
        for sc in list(job.staged.values()):
            for handle in sc.writing:
                self._release(job, handle)
                job.abandoned = True
            sc.writing.clear()

    def _release(self, job: PushJob, handle: object) -> None:
        try:
            self._agent.release(handle)
        except Exception as e:  # a handle to a dead peer may refuse release; the slot is ours again
            log.info("release of a write handle to %s failed: %s", job.consumer, e)

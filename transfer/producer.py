"""Producer push engine: lease slots on a consumer, write staged chunks, renew, clean up.

The engine thread calls `begin` when a request first appears and `stage` as soon as a
chunk's KV exists (per scheduler step), so writes leave while prefill continues. One
background thread drives NIXL and each transfer's state, sleeping when there is nothing to post or
poll; control calls (lease, renew, window progress, release) run on each consumer's own thread (link_calls.py).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
import zlib
from typing import Callable

import torch
from prometheus_client import Gauge

from transfer import wire
from transfer.announcer import Announcer
from transfer.consumer_link import ConsumerLink
from transfer.link_calls import LinkCalls
from transfer.device_fence import recorder_for
from transfer.geometry import ChunkGeometry
from transfer.identity import TransferSpec
from transfer.layout import KVLayout
from transfer.states import PUSHED_BYTES, State, Transfer
from transfer.threads import start_io_thread
from transfer.nixl_agent import NixlAgent, TransferError
from transfer.notice import ChunkNotice
from transfer.producer_settings import ProducerSettings
from transfer.push_job import PushJob
from transfer.call_answers import answered
from transfer.push_window import window_blocked
from transfer.staging import StagingBuffer

log = logging.getLogger("kvbridge.producer")
STAGING_FREE = Gauge("kvbridge_producer_staging_free_slots", "Producer staging slots not holding a chunk")
STAGING_TOTAL = Gauge("kvbridge_producer_staging_slots", "Producer staging slots in all")
ACTIVE = Gauge("kvbridge_producer_active_transfers", "Transfers this producer has not finished yet")


class Producer:
    def __init__(self, layout: KVLayout, chunk_tokens: int, settings: ProducerSettings) -> None:
        self.layout = layout
        self.chunk_tokens = chunk_tokens
        self.cfg = settings
        self.geometry = ChunkGeometry(layout, chunk_tokens)
        self.incarnation = uuid.uuid4().hex
        self.generation = time.time_ns()  # a restart of the same producer id is a newer generation
        self.agent = NixlAgent(f"kvb-producer-{settings.producer_id}-{self.incarnation[:12]}")
        self._record_fence = settings.fence or recorder_for(settings.device)
        self.staging = StagingBuffer(self.agent, settings.staging_chunks, self.geometry.slot_bytes, settings.device)
        self._hello = wire.Hello(producer_id=settings.producer_id, generation=self.generation,
                                 incarnation=self.incarnation, layout=layout, chunk_tokens=chunk_tokens,
                                 agent_name=self.agent.name, agent_meta=self.agent.metadata())
        self._calls = LinkCalls(lambda c: ConsumerLink(c, self.agent, self._hello, settings.secret,
                                                     settings.rpc_timeout_s), self._wake)
        self.announcer = Announcer(lambda a: ConsumerLink(a, self.agent, self._hello, settings.secret,
                                                          settings.rpc_timeout_s))
        self._jobs: dict[str, PushJob] = {}
        STAGING_FREE.set_function(lambda: self.staging.free)
        STAGING_TOTAL.set(settings.staging_chunks)
        ACTIVE.set_function(lambda: len(self._jobs))
        self._finished: list[Transfer] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread = start_io_thread(self._run, "kvbridge-producer")

    def begin(self, spec: TransferSpec, consumer: str) -> str:
        """Start pushing one transfer attempt; returns its handle for `stage` and `abort` ('' when this
        key is already being pushed: its consumer gets the bytes once)."""
        handle = f"{spec.key}@{spec.attempt}"
        with self._cv:
            if any(j.spec.key == spec.key and not (j.abort or j.t.done) for j in self._jobs.values()):
                return ""  # the same prompt is on its way already (n > 1, a repeated prompt): one push is enough
            self._jobs[handle] = PushJob(Transfer(handle, "producer"), spec, consumer,
                                      self.geometry.n_chunks(spec.num_tokens))
            self._cv.notify()
        return handle

    def stage(self, handle: str, chunk: int, fill: Callable[[torch.Tensor], int]) -> bool:
        """Queue the gather of one chunk into staging (caller's thread) and its write, which the push
        thread posts once the gather's fence is done. False when the transfer already ended or staging
        stayed full (the transfer then fails). A chunk the consumer already holds is not gathered."""
        ready_at = time.time()  # the forward that computed this chunk has ended: the consumer's exposed time starts
        with self._cv:
            job = self._jobs.get(handle)
            if job is None or job.t.done:
                return False
            if job.grant is not None and chunk < job.grant.skip_chunks:
                return True
        slot = self.staging.acquire(self.cfg.staging_wait_s)
        if slot is None:
            self._fail(handle, f"staging full for {self.cfg.staging_wait_s}s")
            return False
        nbytes = fill(self.staging.view(slot))
        fence = self._record_fence()
        with self._cv:
            if job.t.done:
                self.staging.release(slot)
                return False
            job.staged[chunk] = (slot, nbytes, fence)
            job.kv_ready_at[chunk] = ready_at
            self._cv.notify()
        return True

    def abort(self, handle: str) -> None:
        with self._cv:
            job = self._jobs.get(handle)
            if job is not None:
                job.abort = True
                self._cv.notify()

    def take_finished(self) -> list[Transfer]:
        with self._cv:
            out, self._finished = self._finished, []
            return out

    def link(self, consumer: str) -> ConsumerLink:
        return self._calls.link(consumer)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            for job in self._jobs.values():
                job.abort = True
            self._cv.notify()
        self._thread.join(timeout=10)
        self.announcer.close()
        self._calls.close()
        self.staging.close()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _fail(self, transfer_id: str, reason: str) -> None:
        with self._cv:
            job = self._jobs.get(transfer_id)
            if job is not None:
                job.t.to(State.FAILED, reason)
                self._cv.notify()

    def _run(self) -> None:
        tended = 0.0
        while True:
            with self._cv:
                if self._stop and not self._jobs:
                    return
                jobs = list(self._jobs.values())
            now = time.monotonic()
            if now - tended >= 0.5:  # every link's connection events read (consumer_link.py says why)
                self._calls.tend()
                self.announcer.tend()
                tended = now
            for job in jobs:
                try:
                    self._step(job, now)
                except Exception as e:  # one transfer's surprise must not stop every other push on this node
                    log.exception("transfer %s: unexpected error; failing it", job.t.transfer_id)
                    job.t.to(State.FAILED, f"unexpected {type(e).__name__}: {e}")
                    self._give_up(job)
            with self._cv:  # an answer that came before this wait is seen here, its wake-up long gone
                timeout = max(0.0, min([1.0, *(j.due_in(now) for j in self._jobs.values())]))
                if timeout > 0:
                    self._cv.wait(timeout)

    def _step(self, job: PushJob, now: float) -> None:
        t = job.t
        if job.abort and not t.done:
            t.to(State.ABORTED, "aborted by the engine")
        if t.state == State.SENDING and self._calls.gone(job.consumer):  # its lease died with it: no RPC there
            job.peer_down = t.to(State.FAILED, f"consumer {job.consumer} closed its connection (process gone?)")
        if job.call is not None and job.call.done():
            answered(job, *job.call_of, self.cfg)
        if t.state in (State.NEW, State.ALLOCATING) and now >= job.retry_at and job.call is None:
            if t.state == State.NEW:
                t.to(State.ALLOCATING)
            self._ask(job, "alloc", lambda link, s=job.spec, ttl=self.cfg.lease_ttl_s: link.alloc(s, ttl))
        if t.state == State.SENDING:
            self._post(job, now)
        self._poll(job, now)
        if t.state == State.SENDING and job.sent == job.n_chunks - job.grant.skip_chunks:
            t.to(State.SENT)
        if t.done and not job.inflight and job.call is None:
            self._cleanup(job)

    def _ask(self, job: PushJob, kind: str, call: Callable[[ConsumerLink], object]) -> None:
        job.call, job.call_of = self._calls.submit(job.consumer, call), (kind, time.monotonic())

    def _post(self, job: PushJob, now: float) -> None:
        if job.staged and now >= job.deadline:
            job.t.to(State.FAILED, "lease deadline reached before all chunks were written")
            return
        link = self._calls.link(job.consumer)
        if job.call is None and window_blocked(job, self._cv, now):
            key, epoch, ttl = job.spec.key, job.grant.epoch, self.cfg.lease_ttl_s
            self._ask(job, "progress", lambda link: link.progress(key, epoch, ttl))
        with self._cv:
            ready = [(c, job.staged.pop(c)) for c in sorted(job.staged) if job.staged[c][2].done() and job.may_write(c)]
        skip = job.grant.skip_chunks
        for i, (chunk, (slot, nbytes, _)) in enumerate(ready):
            if chunk < skip:  # staged before the grant said the consumer holds it
                self.staging.release(slot)
                continue
            want = self.geometry.chunk_nbytes(job.spec.num_tokens, chunk)
            if nbytes != want or nbytes > link.welcome.slot_bytes:
                self._stop_posting(job, slot, ready[i + 1:], f"chunk {chunk} holds {nbytes} bytes, it must hold "
                                   f"{want} (slot {link.welcome.slot_bytes})")
                return
            data = self.staging.view(slot)[:nbytes]
            notice = ChunkNotice(transfer_id=job.spec.key, chunk=chunk - skip, epoch=job.grant.epoch,
                                 incarnation=self.incarnation, nbytes=nbytes,
                                 crc=zlib.crc32(data.cpu().numpy()) if self.cfg.checksum else None,
                                 kv_ready_at=job.kv_ready_at.pop(chunk, None))
            w = link.welcome
            if w.incarnation != job.grant.incarnation:  # its slots may be another transfer's now
                self._stop_posting(job, slot, ready[i + 1:], f"consumer {job.consumer} restarted (incarnation "
                                   f"{job.grant.incarnation[:12]} -> {w.incarnation[:12]}) after granting the lease")
                return
            try:
                dst = job.grant.offsets[(chunk - skip) % len(job.grant.offsets)]  # a window reuses its slots
                handle = self.agent.write(self.staging.region, [(self.staging.offset(slot), dst, nbytes)],
                                          w.agent_name, w.mem_type, w.dev_id, notice.encode())
            except TransferError as e:
                job.peer_down = e.peer_gone  # NIXL saw the consumer die: its lease went with it
                self._stop_posting(job, slot, ready[i + 1:], str(e))
                return
            job.inflight[chunk] = (handle, slot)
            PUSHED_BYTES.inc(nbytes)
        if now >= job.next_renew and not job.t.done and job.call is None:
            key, epoch, ttl = job.spec.key, job.grant.epoch, self.cfg.lease_ttl_s
            self._ask(job, "renew", lambda link: link.renew(key, epoch, ttl))

    def _stop_posting(self, job: PushJob, slot: int, rest: list, why: str) -> None:
        """Fail `job` at a chunk not written: its staging slot is free again, the chunks behind it go back to
        `job.staged` (freed with the job)."""
        self.staging.release(slot)
        with self._cv:
            job.staged.update(dict(rest))
        job.t.to(State.FAILED, why)

    def _poll(self, job: PushJob, now: float) -> None:
        # A write to a peer that died may never complete (UCX without error handling):
        # past the lease deadline plus the margin nobody will read those bytes, so give up.
        stuck = bool(job.inflight) and now > job.deadline + self.cfg.write_margin_s
        for chunk, (handle, slot) in list(job.inflight.items()):
            state = "ERR" if stuck else self.agent.poll(handle)
            if state == "PROC":
                continue
            try:
                self.agent.release(handle)
            except Exception as e:  # a handle to a dead peer may refuse release; the slot is ours again
                log.info("release of a write handle to %s failed: %s", job.consumer, e)
            self.staging.release(slot)
            del job.inflight[chunk]
            if state == "DONE":
                job.sent += 1
            else:
                job.t.to(State.FAILED, f"write of chunk {chunk} to {job.consumer} failed")

    def _give_up(self, job: PushJob) -> None:
        """Free everything a failed job holds, in-flight writes included (their bytes go nowhere we read)."""
        for handle, slot in job.inflight.values():
            try:
                self.agent.release(handle)
            except Exception as e:
                log.info("release of a write handle to %s failed: %s", job.consumer, e)
            self.staging.release(slot)
        job.inflight.clear()
        if job.call is None:
            self._cleanup(job)

    def _cleanup(self, job: PushJob) -> None:
        """Staging back now; the lease released (its answer awaited, so a finished transfer's slots are
        free on the consumer), then the job is forgotten."""
        for slot, *_ in job.staged.values():
            self.staging.release(slot)
        job.staged.clear()
        gave_up = job.t.state == State.FAILED
        if job.t.state != State.SENT and not job.peer_down and (job.grant is not None or gave_up) \
                and not job.released:
            # A failure is reported so the decode request follows its policy now; an abort (preemption,
            # request gone) only frees the lease: a new attempt may follow.
            key, epoch, why = job.spec.key, job.grant.epoch if job.grant else 0, job.t.reason if gave_up else ""
            job.released = True
            self._ask(job, "release", lambda link: link.release(key, epoch, why))
            return
        with self._cv:
            if self._jobs.pop(job.t.transfer_id, None) is not None:
                self._finished.append(job.t)

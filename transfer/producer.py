"""Producer push engine: lease slots on a consumer, write staged chunks, renew, clean up.

The engine thread calls `begin` when a request first appears and `stage` as soon as a chunk's KV exists (per
scheduler step), or `open` a chunk before the forward that computes it and `stage_part` each group of its layers as
the forward goes (staged_chunk.py), so writes leave while prefill continues. One background thread drives NIXL and
each transfer's state, sleeping when there is nothing to post or poll; control calls (lease, renew, window progress,
release) run on each consumer's own thread (link_calls.py).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
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
from transfer.states import State, Transfer
from transfer.threads import start_io_thread
from transfer.nixl_agent import NixlAgent
from transfer.producer_settings import ProducerSettings
from transfer.push_job import PushJob
from transfer.call_answers import answered
from transfer.chunk_writes import ChunkWrites
from transfer.fence_writes import FenceWrites
from transfer.push_window import window_blocked
from transfer.staged_chunk import HELD, StagedChunk
from transfer.staging import StagingBuffer
from transfer.write_hold import host_facts

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
        self.agent = NixlAgent(f"kvb-producer-{settings.producer_id}-{self.incarnation[:12]}", settings.ucx_error_handling)
        self._record_fence = settings.fence or recorder_for(settings.device)
        self.staging = StagingBuffer(self.agent, settings.staging_chunks, self.geometry.slot_bytes, settings.device)
        self._hello = wire.Hello(producer_id=settings.producer_id, generation=self.generation, layout=layout,
                                 incarnation=self.incarnation, chunk_tokens=chunk_tokens, agent_name=self.agent.name,
                                 agent_meta=self.agent.metadata(), **host_facts())
        self._calls = LinkCalls(lambda c: ConsumerLink(c, self.agent, self._hello, settings.secret,
                                                     settings.rpc_timeout_s), self._wake)
        self.announcer = Announcer(lambda a: ConsumerLink(a, self.agent, self._hello, settings.secret,
                                                          settings.rpc_timeout_s))
        self._jobs: dict[str, PushJob] = {}
        self._cv = threading.Condition()  # guards `_jobs` and what the engine thread hands over (`staged`)
        self._writes = ChunkWrites(self.agent, self.staging, self.geometry, self.incarnation, settings.checksum,
                                   self._cv)
        self._fences = FenceWrites(self.agent, self.staging, self.incarnation)
        STAGING_FREE.set_function(lambda: self.staging.free)
        STAGING_TOTAL.set(settings.staging_chunks)
        ACTIVE.set_function(lambda: len(self._jobs))
        self._finished: list[Transfer] = []
        self._stop = False
        self._pushes = itertools.count(1)  # numbers each push's handle
        self._thread = start_io_thread(self._run, "kvbridge-producer")

    def begin(self, spec: TransferSpec, consumer: str) -> str:
        """A new push of one transfer attempt: its own handle for `stage` and `abort`, so an ended push's takes no
        chunk; '' while the key is being pushed (one push serves it) or this attempt's last push is being cleaned up."""
        with self._cv:
            if any(j.spec.key == spec.key and (j.spec.attempt == spec.attempt or not (j.abort or j.t.done))
                   for j in self._jobs.values()):
                return ""  # the same prompt is on its way already (n > 1, a repeated prompt): one push is enough
            handle = f"{spec.key}@{spec.attempt}#{next(self._pushes)}"
            self._jobs[handle] = PushJob(Transfer(handle, "producer"), spec, consumer,
                                      self.geometry.n_chunks(spec.num_tokens))
            self._cv.notify()
        return handle

    def stage(self, handle: str, chunk: int, fill: Callable[[torch.Tensor], int]) -> bool:
        """Gather one whole chunk into staging now (`fill`, on the caller's thread) and queue its write, which
        the push thread posts once the gather's fence is done. False when the transfer already ended or
        staging stayed full (the transfer then fails). A chunk the consumer already holds is not gathered."""
        ready_at = time.time()  # the forward that computed this chunk has ended: the consumer's exposed time starts
        slot = self.open(handle, chunk)
        if slot is None or slot == HELD:
            return slot == HELD
        nbytes = fill(self.staging.view(slot))
        return self.stage_part(handle, chunk, slot, 0, nbytes, last=True, ready_at=ready_at)

    def open(self, handle: str, chunk: int, wait: bool = True) -> int | None:
        """A staging slot for `chunk` of transfer `handle`, to fill in ranges (`stage_part`, the last one with
        `last`); HELD when the consumer already holds the chunk; None when the transfer ended, or no slot was
        free (without `wait`: the transfer goes on), or staging stayed full (with `wait`: the transfer fails)."""
        with self._cv:
            job = self._jobs.get(handle)
            if job is None or job.t.done:
                return None
            if job.grant is not None and chunk < job.grant.skip_chunks:
                return HELD
        slot = self.staging.acquire(self.cfg.staging_wait_s if wait else 0.0)
        if slot is None:
            if wait:
                self._fail(handle, f"staging full for {self.cfg.staging_wait_s}s")
            return None
        with self._cv:
            if job.t.done:
                self.staging.release(slot)
                return None
            job.staged[chunk] = StagedChunk(slot)
        return slot

    def stage_part(self, handle: str, chunk: int, slot: int, start: int, end: int, last: bool = False,
                   ready_at: float | None = None) -> bool:
        """Bytes `start:end` of `chunk`'s slot are gathered (queued on the caller's stream just now): write them
        once that is done; `last` marks the chunk whole, its notice going with this range. False when the
        transfer ended: the caller stops filling the slot, which is free again (at once, or once the writes
        already posted from it are done with)."""
        fence = self._record_fence()
        with self._cv:
            job = self._jobs.get(handle)
            sc = job.staged.get(chunk) if job is not None else None
            if sc is None or job.t.done:
                if sc is None:
                    self.staging.release(slot)  # the caller's until now (staged_chunk.py)
                else:  # writes from it may be in flight: the push thread frees it with the job (`_cleanup`)
                    sc.parts.clear()
                    sc.whole = True
                    self._cv.notify()
                return False
            sc.parts.append((start, end, fence))
            if last:
                sc.whole, sc.nbytes, sc.kv_ready_at = True, end, ready_at or time.time()
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
        self._fences.flush(2.0)  # before the links and the agent go
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
                self._fences.poll(now)
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
        if t.done and not job.writing() and job.call is None:
            self._cleanup(job)

    def _ask(self, job: PushJob, kind: str, call: Callable[[ConsumerLink], object]) -> None:
        job.call, job.call_of = self._calls.submit(job.consumer, call), (kind, time.monotonic())

    def _post(self, job: PushJob, now: float) -> None:
        if any(not sc.announced for sc in list(job.staged.values())) and now >= job.deadline:
            job.t.to(State.FAILED, "lease deadline reached before all chunks were written")
            return
        link = self._calls.link(job.consumer)
        if job.call is None and window_blocked(job, self._cv, now):
            key, epoch, ttl = job.spec.key, job.grant.epoch, self.cfg.lease_ttl_s
            self._ask(job, "progress", lambda link: link.progress(key, epoch, ttl))
        skip, todo = job.grant.skip_chunks, []
        with self._cv:
            for chunk, sc in sorted(job.staged.items()):
                if chunk < skip:  # staged before the grant said the consumer holds it: nothing of it is written
                    sc.parts.clear()
                    if sc.whole and not sc.writing:
                        self.staging.release(sc.slot)
                        del job.staged[chunk]
                elif job.may_write(chunk):
                    todo.append((chunk, sc, *sc.take()))
        for chunk, sc, ranges, due in todo:
            if (ranges or due) and not self._writes.post(job, link.welcome, chunk, sc, ranges, due):
                return
        if now >= job.next_renew and not job.t.done and job.call is None:
            key, epoch, ttl = job.spec.key, job.grant.epoch, self.cfg.lease_ttl_s
            self._ask(job, "renew", lambda link: link.renew(key, epoch, ttl))

    def _poll(self, job: PushJob, now: float) -> None:
        # A write to a peer that died may never complete (UCX without error handling):
        # past the lease deadline plus the margin nobody will read those bytes, so give up.
        self._writes.poll(job, stuck=job.writing() and now > job.deadline + self.cfg.write_margin_s)

    def _give_up(self, job: PushJob) -> None:
        """Free everything a failed job holds, in-flight writes included (their bytes go nowhere we read)."""
        self._writes.drop(job)
        if job.call is None:
            self._cleanup(job)

    def _cleanup(self, job: PushJob) -> None:
        """Staging back now; the lease released (its answer awaited, so a finished transfer's slots are
        free on the consumer), then the job is forgotten."""
        with self._cv:
            self._free_whole(job)
        if job.grant is not None and job.t.state != State.SENT and not job.fenced:
            # also to a consumer that stopped answering: a cut link delivers it after the writes it holds
            job.fenced = True
            self._fences.send(job, self._calls.link(job.consumer).welcome)
        gave_up = job.t.state == State.FAILED
        if job.t.state != State.SENT and not job.peer_down and (job.grant is not None or gave_up) \
                and not job.released:
            # A failure is reported so the decode request follows its policy now; an abort (preemption,
            # request gone) only frees the lease: a new attempt may follow.
            key, epoch, why = job.spec.key, job.grant.epoch if job.grant else 0, job.t.reason if gave_up else ""
            job.released, done = True, not job.abandoned
            self._ask(job, "release", lambda link: link.release(key, epoch, why, done))
            return
        with self._cv:  # with the pop: a chunk the engine thread gave up meanwhile is freed here, not leaked
            self._free_whole(job)
            if self._jobs.pop(job.t.transfer_id, None) is not None:
                self._finished.append(job.t)

    def _free_whole(self, job: PushJob) -> None:
        """Free the slots of the job's whole chunks (no write from them is in flight: the job is done and its
        writes polled or dropped); one the engine thread still fills is its to free (staged_chunk.py)."""
        for chunk, sc in list(job.staged.items()):
            if sc.whole:
                self.staging.release(sc.slot)
                del job.staged[chunk]

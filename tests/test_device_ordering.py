"""The device-ordering contract, on CPU, with copies that complete late: a gather or scatter "queued" on the
engine thread only happens when the test completes it, as on a GPU stream still busy with the forward.
The producer must not post a chunk before its gather ran (else the consumer would receive the bytes the
slot held before); the consumer must not free a slot before the scatter reading it ran (else a new grant
could overwrite it); and neither waits on the engine thread (a wait would hang these tests, since only
the test completes the copies)."""
from __future__ import annotations

import threading
import time
import zlib

import torch

from launch.polling import wait_for
from tests.test_transfer import CHUNK_TOKENS, LAYOUT, check_landed, consumer, finished, spec  # noqa: F401
from transfer.producer import Producer, ProducerSettings
from transfer.receive_book import ReceiveBook
from transfer.slot_pool import SlotPool
from transfer.notice import ChunkNotice
from transfer.states import State


class LateCopies:
    """A stand-in device stream: copies queue up and run only at `complete`; fences report done after."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: list = []
        self._ran = 0

    def queue(self, copy) -> None:
        with self._lock:
            self._queued.append(copy)

    def fence(self):
        with self._lock:
            mark = self._ran + len(self._queued)
        copies = self

        class _Fence:
            def done(self) -> bool:
                with copies._lock:
                    return copies._ran >= mark
        return _Fence()

    def complete(self) -> None:
        with self._lock:
            queued, self._queued = self._queued, []
            for copy in queued:
                copy()
            self._ran += len(queued)


def test_a_chunk_leaves_only_after_the_gather_that_wrote_it_completed(consumer):  # noqa: F811
    stream = LateCopies()
    p = Producer(LAYOUT, CHUNK_TOKENS, ProducerSettings(producer_id="late-gather", fence=stream.fence))
    try:
        s = spec("late-1", 2)
        handle = p.begin(s, consumer.address)
        datas = [torch.randint(1, 256, (p.geometry.chunk_nbytes(s.num_tokens, i),), dtype=torch.uint8)
                 for i in range(2)]
        for i, data in enumerate(datas):
            def fill(view, data=data):
                stream.queue(lambda: view[:len(data)].copy_(data))  # the gather runs later, as on a GPU stream
                return len(data)
            assert p.stage(handle, i, fill)  # returns at once: the engine thread never waits for the copy
        wait_for(lambda: p._jobs[handle].t.state == State.SENDING, 5, 0.01, "lease granted")
        time.sleep(0.3)  # the push thread polls every 0.2 ms while chunks are staged: ample chances to post early
        assert consumer.call("lease", "late-1")["arrived"] == [], "a chunk was posted before its gather ran"
        stream.complete()
        assert finished(p, {"late-1"})["late-1"] == State.SENT
        check_landed(consumer, "late-1", [zlib.crc32(d.numpy()) for d in datas])
        assert p.staging.free == p.staging.num_slots
    finally:
        p.close()


def notice(key: str, chunk: int, epoch: int, nbytes: int) -> ChunkNotice:
    return ChunkNotice(transfer_id=key, chunk=chunk, epoch=epoch, incarnation="p1", nbytes=nbytes)


def test_a_slot_is_freed_only_after_the_scatter_reading_it_completed():
    pool = SlotPool(num_slots=2, slot_bytes=100, quarantine_s=0)
    book = ReceiveBook(pool, unclaimed_ttl_s=30)
    stream = LateCopies()
    book.expect("k1", 10, "h1")
    lease = pool.grant("k1", [100, 100], ttl_s=30, producer="p1")
    book.granted("k1", lease.epoch, 10, "h1")
    for c in range(2):
        assert pool.accept(notice("k1", c, lease.epoch, 100)) == ""
    claimed, why = book.claim("k1")
    assert claimed is not None, why
    stream.queue(lambda: None)  # the scatter out of both slots, still queued on the device
    book.finish("k1", claimed, {"state": "SCATTERED"}, stream.fence())  # returns at once
    assert pool.stats().free == 0
    assert pool.grant("k2", [100], ttl_s=30, producer="p1") is None, "a slot was granted while a scatter read it"
    assert book.settle() == 1 and pool.stats().free == 0
    stream.complete()
    assert book.settle() == 0
    assert pool.stats().free == 2
    assert pool.grant("k2", [100], ttl_s=30, producer="p1") is not None

"""Chunks pushed in parts (one per group of layers, as the prefill's forward computes them), over real NIXL.

The consumer takes a chunk's notice as "the whole chunk is in the slot", so the part that carries the notice
must be written after every other part of the chunk landed, and a chunk whose transfer ends while the
engine thread still fills it must give its staging slot back exactly once.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
import zlib

import pytest
import torch
from prometheus_client import REGISTRY

from launch.polling import wait_for
from tests.consumer_proc import ConsumerProcess
from tests.test_device_ordering import LateCopies
from pd.paged_kv import PagedKV
from pd.push_side import PushSide
from pd.step_metadata import OutgoingTask
from tests.test_transfer import (CHUNK_TOKENS, LAYOUT, check_landed, consumer, finished,  # noqa: F401
                                 make_producer, spec)
from transfer.device_fence import COMPLETED
from transfer.producer import Producer, ProducerSettings
from transfer.staged_chunk import StagedChunk
from transfer.states import State


def chunk_bytes(p: Producer, s, chunk: int) -> torch.Tensor:
    return torch.randint(1, 256, (p.geometry.chunk_nbytes(s.num_tokens, chunk),), dtype=torch.uint8)


def half_staged(p: Producer, consumer_address: str, key: str) -> tuple[str, int, int]:
    """A one-chunk push, granted, whose chunk's first half is handed over: (handle, slot, chunk bytes)."""
    s = spec(key, 1)
    handle = p.begin(s, consumer_address)
    wait_for(lambda: p._jobs[handle].t.state == State.SENDING, 5, 0.01, "lease granted")
    slot, n = p.open(handle, 0), p.geometry.chunk_nbytes(s.num_tokens, 0)
    assert p.stage_part(handle, 0, slot, 0, n // 2)
    return handle, slot, n


def test_a_chunk_in_parts_is_announced_only_after_its_last_part_and_lands_equal(consumer):  # noqa: F811
    stream = LateCopies()
    p = Producer(LAYOUT, CHUNK_TOKENS, ProducerSettings(producer_id="parts", fence=stream.fence, checksum=True))
    try:
        s = spec("parts-1", 2)
        handle = p.begin(s, consumer.address)
        wait_for(lambda: p._jobs[handle].t.state == State.SENDING, 5, 0.01, "lease granted")
        datas = [chunk_bytes(p, s, i) for i in range(2)]
        slots = [p.open(handle, i) for i in range(2)]
        for i, (slot, data) in enumerate(zip(slots, datas)):  # three parts per chunk, the first one's copy late
            view, n = p.staging.view(slot), len(data)
            cuts = [0, n // 4, n // 2, n]
            stream.queue(lambda view=view, data=data, a=cuts[0], b=cuts[1]: view[a:b].copy_(data[a:b]))
            assert p.stage_part(handle, i, slot, cuts[0], cuts[1])
            view[cuts[1]:cuts[2]].copy_(data[cuts[1]:cuts[2]])
            assert p.stage_part(handle, i, slot, cuts[1], cuts[2])
        time.sleep(0.2)
        assert consumer.call("lease", "parts-1")["arrived"] == [], "a chunk was announced before it was whole"
        for i, (slot, data) in enumerate(zip(slots, datas)):
            view, n = p.staging.view(slot), len(data)
            view[n // 2:].copy_(data[n // 2:])
            assert p.stage_part(handle, i, slot, n // 2, n, last=True)
        time.sleep(0.2)
        assert consumer.call("lease", "parts-1")["arrived"] == [], "the notice overtook a part still being gathered"
        stream.complete()
        assert finished(p, {"parts-1"})["parts-1"] == State.SENT
        check_landed(consumer, "parts-1", [zlib.crc32(d.numpy()) for d in datas])
        assert p.staging.free == p.staging.num_slots
    finally:
        p.close()


def test_a_transfer_that_ends_while_a_chunk_is_half_staged_gives_its_slot_back_once(consumer):  # noqa: F811
    p = Producer(LAYOUT, CHUNK_TOKENS, ProducerSettings(producer_id="parts-abort"))
    try:
        handle, slot, n = half_staged(p, consumer.address, "parts-2")
        p.abort(handle)
        assert finished(p, {"parts-2"})["parts-2"] == State.ABORTED
        assert p.staging.free == p.staging.num_slots - 1, "the push thread freed a slot the engine still fills"
        assert not p.stage_part(handle, 0, slot, n // 2, n, last=True)
        assert p.staging.free == p.staging.num_slots
    finally:
        p.close()


def staged(how: str) -> float:
    return REGISTRY.get_sample_value("kvbridge_producer_chunks_staged_total", {"how": how}) or 0.0


@pytest.mark.parametrize("groups,calls", [(2, True), (1, True), (2, False)])
def test_chunks_handed_over_layer_by_layer_land_as_a_whole_gather_would(consumer, groups, calls):  # noqa: F811
    """`calls` False: a backend that never calls save_kv_layer; the chunks then go whole after the forward."""
    views = [torch.randn(32, 2, LAYOUT.block_size, 2 * LAYOUT.head_size) for _ in range(LAYOUT.num_layers)]
    kv = PagedKV(views, LAYOUT)
    p = make_producer(f"layers-{groups}-{calls}")
    push = PushSide(kv, p, None, CHUNK_TOKENS // LAYOUT.block_size, ["m.layers.0.attn", "m.layers.1.attn"], groups)
    try:
        s = spec(f"layers-{groups}-{calls}", 3, last_tokens=20)  # 148 tokens: 10 blocks, the last chunk 2 of them
        block_ids = random.Random(groups).sample(range(32), 10)
        task = OutgoingTask("r1", s, consumer.address, s.num_tokens, block_ids, ready_tokens=s.num_tokens)
        before = staged("layers"), staged("whole")
        assert push.begin([task]) == (groups > 1)
        for name in ["m.layers.0.attn", "m.layers.1.attn"] if calls else []:  # as vLLM calls it after each layer
            push.layer_done(name)
        push.after_forward([task])
        by_layers = groups > 1 and calls
        assert (staged("layers") - before[0], staged("whole") - before[1]) == ((3, 0) if by_layers else (0, 3))
        assert finished(p, {s.key})[s.key] == State.SENT
        crcs = []
        for chunk in range(3):
            ids = block_ids[chunk * 4:(chunk + 1) * 4]
            whole = torch.empty(kv.chunk_nbytes(len(ids)), dtype=torch.uint8)
            kv.gather(ids, whole)
            crcs.append(zlib.crc32(whole.numpy()))
        check_landed(consumer, s.key, crcs)
        assert p.staging.free == p.staging.num_slots
    finally:
        p.close()


def test_the_notice_range_waits_until_every_other_range_of_its_chunk_was_written_and_completed():
    sc = StagedChunk(slot=0)
    late = LateCopies()
    late.queue(lambda: None)  # the second range's gather, still queued
    sc.parts += [(0, 10, COMPLETED), (10, 20, late.fence()), (20, 30, COMPLETED)]
    sc.whole, sc.nbytes = True, 30
    assert sc.take() == ([(0, 10)], None), "the last range went while another was still being gathered"
    sc.writing.append("write of 0:10")
    late.complete()
    assert sc.take() == ([(10, 20)], None), "the last range went in the same pass as another range"
    sc.writing.append("write of 10:20")
    assert sc.take() == ([], None), "the last range went while other writes were in flight"
    sc.writing.clear()
    assert sc.take() == ([], (20, 30)) and sc.announced
    assert sc.take() == ([], None)


def _thread_cpu_s(name: str) -> float:
    tid = next(t.native_id for t in threading.enumerate() if t.name == name)
    fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_the_push_thread_sleeps_while_the_forward_fills_an_open_chunk(consumer):  # noqa: F811
    """A chunk opened before the forward holds no range to write for most of it (seconds, for a long prompt);
    the push thread, on the prefill's cores and interpreter, must sleep meanwhile. It once spun there: four
    1000-token prefills took 11 s of CPU on that thread, and their TTFT went from 2.1-2.7 s to 3.6-4.6 s."""
    p = make_producer("parts-idle")
    try:
        handle, slot, n = half_staged(p, consumer.address, "parts-3")
        wait_for(lambda: not p._jobs[handle].writing() and not p._jobs[handle].staged[0].parts, 5, 0.01,
                 "first range written")
        t0, cpu0 = time.monotonic(), _thread_cpu_s("kvbridge-producer")
        time.sleep(1.0)
        busy = (_thread_cpu_s("kvbridge-producer") - cpu0) / (time.monotonic() - t0)
        assert busy < 0.05, f"the push thread used {busy:.2f} of a core waiting for the rest of a chunk"
        assert p.stage_part(handle, 0, slot, n // 2, n, last=True)
        assert finished(p, {"parts-3"})["parts-3"] == State.SENT
        assert consumer.call("release", "parts-3")
        assert p.staging.free == p.staging.num_slots
    finally:
        p.close()


def test_a_half_staged_chunk_whose_write_is_in_flight_when_its_transfer_ends_is_freed_after_the_write():
    """The engine thread learns that the transfer ended while a range of the chunk it fills is still being
    written: the slot must stay taken until that write is done with (else a new chunk could be gathered into
    memory NIXL still reads), and be freed exactly once after."""
    c = ConsumerProcess(LAYOUT, chunk_tokens=CHUNK_TOKENS, num_slots=4)
    p = make_producer("parts-inflight")
    try:
        s = spec("parts-4", 1)
        handle = p.begin(s, c.address)
        wait_for(lambda: p._jobs[handle].t.state == State.SENDING, 5, 0.01, "lease granted")
        slot, n = p.open(handle, 0), p.geometry.chunk_nbytes(s.num_tokens, 0)
        os.kill(c.proc.pid, signal.SIGSTOP)  # a write completes only once the consumer drives NIXL
        try:
            assert p.stage_part(handle, 0, slot, 0, n // 2)
            wait_for(lambda: p._jobs[handle].writing(), 5, 0.001, "first range in flight")
            p.abort(handle)
            wait_for(lambda: p._jobs[handle].t.done, 5, 0.001, "transfer ended")
            assert not p.stage_part(handle, 0, slot, n // 2, n, last=True)
            assert p.staging.free == p.staging.num_slots - 1, "a slot was freed while a write from it was in flight"
        finally:
            os.kill(c.proc.pid, signal.SIGCONT)
        assert finished(p, {"parts-4"})["parts-4"] == State.ABORTED
        assert p.staging.free == p.staging.num_slots
    finally:
        p.close()
        c.stop()


def test_ranges_of_a_chunk_the_consumer_holds_are_dropped_and_do_not_keep_the_push_thread_awake(consumer):  # noqa: F811
    """A chunk opened before the grant said the consumer holds it (its own prefix cache) keeps receiving ranges
    until the forward ends: none is written, the push thread sleeps meanwhile, and its slot is freed once whole."""
    p = make_producer("parts-held")
    try:
        s = spec("parts-5", 2)
        consumer.call("expect", (s.key, s.num_tokens, s.token_hash, 1, 1))  # the decode request holds chunk 0
        os.kill(consumer.proc.pid, signal.SIGSTOP)  # the grant cannot come before chunk 0 is opened
        try:
            handle = p.begin(s, consumer.address)
            slot, n = p.open(handle, 0), p.geometry.chunk_nbytes(s.num_tokens, 0)
        finally:
            os.kill(consumer.proc.pid, signal.SIGCONT)
        wait_for(lambda: p._jobs[handle].t.state == State.SENDING, 5, 0.01, "lease granted")
        assert p._jobs[handle].grant.skip_chunks == 1
        assert p.stage_part(handle, 0, slot, 0, n // 2)
        time.sleep(0.1)
        t0, cpu0 = time.monotonic(), _thread_cpu_s("kvbridge-producer")
        time.sleep(1.0)
        busy = (_thread_cpu_s("kvbridge-producer") - cpu0) / (time.monotonic() - t0)
        assert busy < 0.05, f"the push thread used {busy:.2f} of a core beside a chunk it will never write"
        assert p.stage_part(handle, 0, slot, n // 2, n, last=True)
        data = chunk_bytes(p, s, 1)
        assert p.stage(handle, 1, lambda view: view[:len(data)].copy_(data).numel())
        assert finished(p, {"parts-5"})["parts-5"] == State.SENT
        check_landed(consumer, "parts-5", [zlib.crc32(data.numpy())])  # the lease holds prompt chunk 1 only
        assert p.staging.free == p.staging.num_slots
    finally:
        p.close()

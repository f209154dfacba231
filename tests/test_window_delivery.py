"""Transfers larger than the consumer's slot pool stream through a window (real NIXL, two processes): every
byte lands right, the consumer never holds more than its window, the pool and staging come back full; a
chunk outside the open window fails the transfer; a large window is not starved by small grants."""
from __future__ import annotations

import pytest

from launch.polling import wait_for
from tests.consumer_proc import ConsumerProcess
from tests.test_fence_delivery import send_fence
from tests.test_transfer import CHUNK_TOKENS, LAYOUT, finished, make_producer, push, spec
from transfer import wire
from transfer.geometry import ChunkGeometry
from transfer.lease_desk import LeaseDesk
from transfer.notice import ChunkNotice
from transfer.receive_book import ReceiveBook
from transfer.slot_pool import SlotPool
from transfer.states import State

POOL = 4


@pytest.fixture(scope="module")
def consumer():
    c = ConsumerProcess(LAYOUT, chunk_tokens=CHUNK_TOKENS, num_slots=POOL, quarantine_s=0.3, window_slots=POOL)
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def pool_returns_full(consumer):
    yield
    consumer.wait_pool_full()


@pytest.mark.parametrize("times_pool", [3, 8])
def test_a_transfer_of_several_pools_streams_through_the_window(consumer, times_pool):
    n = times_pool * POOL
    p = make_producer(f"stream-{times_pool}", staging_chunks=POOL)  # staging smaller than the transfer too
    try:
        key = f"w-{times_pool}"
        consumer.send("read_stream", (key, spec(key, n, 40).num_tokens, "ab" * 16, 30))
        crcs = push(p, consumer, key, n, last_tokens=40)
        read, why, most = consumer.recv()
        assert why == "" and read == crcs  # every chunk, in order, byte for byte (crc checked before "scatter")
        assert most <= POOL
        assert finished(p, {key})[key] == State.SENT
        assert p.staging.free == p.staging.num_slots
        assert consumer.call("counters")["transfers_windowed"] >= 1
    finally:
        p.close()


def test_a_chunk_written_beyond_the_open_window_fails_the_transfer(consumer):
    p = make_producer("window-breaker")
    try:
        link = p.link(consumer.address)
        consumer.call("expect", ("wb-1", 3 * POOL * CHUNK_TOKENS, "ab" * 16))
        grant = link.alloc(spec("wb-1", 3 * POOL), 5.0)
        assert grant.chunks == 3 * POOL and len(grant.offsets) == POOL
        w = link.welcome
        nbytes = p.geometry.chunk_nbytes(3 * POOL * CHUNK_TOKENS, POOL)
        early = ChunkNotice(transfer_id="wb-1", chunk=POOL, epoch=grant.epoch, incarnation=p.incarnation,
                            nbytes=nbytes)  # chunk W goes to slot 0, which chunk 0 has not freed
        h = p.agent.write(p.staging.region, [(0, grant.offsets[0], nbytes)], w.agent_name, w.mem_type, w.dev_id,
                          early.encode())
        wait_for(lambda: p.agent.poll(h) == "DONE", 5, 0.01, "write done")
        p.agent.release(h)
        reason = consumer.ended_reason("wb-1")
        assert "outside the open window 0..3" in reason
        assert consumer.call("stats").quarantined == POOL, "ended unfilled: its slots wait for the producer's fence"
        send_fence(p, w, "wb-1", grant.epoch)  # what a producer's job that failed sends, after its writes
        consumer.wait_pool_full()
    finally:
        p.close()


def alloc(key: str, n_chunks: int) -> wire.Alloc:
    s = spec(key, n_chunks)
    return wire.Alloc(incarnation="p", transfer_id=key, num_tokens=s.num_tokens, token_hash=s.token_hash, ttl_s=5)


def deliver(pool: SlotPool, key: str) -> None:
    """Every chunk of `key`'s lease arrives (a lease ended early rests in quarantine past its deadline)."""
    lease = pool.live(key)
    for c, n in enumerate(lease.chunk_nbytes):
        assert pool.accept(ChunkNotice(transfer_id=key, chunk=c, epoch=lease.epoch, incarnation="p", nbytes=n)) == ""


def test_small_grants_cannot_take_the_slots_a_waiting_window_needs():
    pool = SlotPool(8, ChunkGeometry(LAYOUT, CHUNK_TOKENS).slot_bytes, quarantine_s=0)
    desk = LeaseDesk(pool, ReceiveBook(pool, 30.0), ChunkGeometry(LAYOUT, CHUNK_TOKENS), 0, 4, 0.0, "c-inc")
    assert isinstance(desk.alloc(alloc("small-0", 2)), wire.Grant)
    assert isinstance(desk.alloc(alloc("small-1", 3)), wire.Grant)  # 3 free
    assert isinstance(desk.alloc(alloc("big", 40)), wire.NoCapacity)  # wants a window of 4: queued
    assert isinstance(desk.alloc(alloc("small-2", 1)), wire.NoCapacity)  # would leave the window 2 of 4
    deliver(pool, "small-0")
    pool.release("small-0")  # read and done with: its slots are free at once
    big = desk.alloc(alloc("big", 40))
    assert isinstance(big, wire.Grant) and len(big.offsets) == 4 and big.chunks == 40
    assert isinstance(desk.alloc(alloc("small-2", 1)), wire.Grant)  # the last free slot: nobody waits ahead
    assert len(desk.queue) == 0


def test_a_push_of_a_prompt_its_repeats_have_all_read_is_ended_as_not_pushed_again():
    """The answer the producer reads as ABORTED ("not pushed again"), like a second push into a touched lease."""
    pool = SlotPool(8, ChunkGeometry(LAYOUT, CHUNK_TOKENS).slot_bytes, quarantine_s=0)
    book = ReceiveBook(pool, 30.0)
    desk = LeaseDesk(pool, book, ChunkGeometry(LAYOUT, CHUNK_TOKENS), 0, 4, 0.0, "c-inc")
    s = spec("r", 1)
    for _ in range(2):
        book.expect("r", s.num_tokens, s.token_hash)
    for _ in range(2):
        book.finish("r", None, {"state": "SCATTERED", "reason": "", "ms": {}})
    reply = desk.alloc(alloc("r", 1))
    assert isinstance(reply, wire.Error) and reply.code == wire.LEASE_IN_USE and "delivered" in reply.message
    assert pool.stats().free == 8

"""A producer that cannot push says so, and the consumer's book ends the transfer with its reason at once
(the book itself never ends a transfer by timeout: these endings can only come from the producer's notice);
a producer whose request still waits in its queue keeps the waiting decode request alive (real NIXL, two
processes)."""
from __future__ import annotations

import pytest

from tests.consumer_proc import ConsumerProcess
from tests.test_transfer import CHUNK_TOKENS, LAYOUT, finished, make_producer, spec
from transfer.producer import Producer, ProducerSettings
from transfer.states import State


@pytest.fixture(scope="module")
def consumer():
    c = ConsumerProcess(LAYOUT, chunk_tokens=CHUNK_TOKENS, num_slots=4, quarantine_s=0.2)
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def pool_returns_full(consumer):
    yield
    consumer.wait_pool_full()


def expect_and_end(consumer: ConsumerProcess, p: Producer, key: str, n_chunks: int, stage: int = 0) -> str:
    """A decode request expects `key`; `p` tries to push it (staging `stage` chunks): the reason its
    transfer ended with in the consumer's book."""
    consumer.call("expect", (key, spec(key, n_chunks).num_tokens, "ab" * 16))
    handle = p.begin(spec(key, n_chunks), consumer.address)
    for i in range(stage):
        if not p.stage(handle, i, lambda view: p.geometry.chunk_nbytes(spec(key, n_chunks).num_tokens, i)):
            break
    assert finished(p, {key})[key] == State.FAILED
    reason = consumer.ended_reason(key)
    assert reason.startswith("producer gave up: "), reason
    return reason


def test_a_refused_handshake_reaches_the_waiting_request(consumer):
    p = Producer(LAYOUT, 2 * CHUNK_TOKENS, ProducerSettings(producer_id="other-geometry", alloc_timeout_s=60))
    try:
        assert "rejected the handshake" in expect_and_end(consumer, p, "hs-1", 2)
    finally:
        p.close()


def test_no_slots_for_the_alloc_timeout_reaches_the_waiting_request(consumer):
    hog, p = make_producer("hog"), make_producer("patient", alloc_timeout_s=0.3)
    try:
        # every slot, for longer than we wait (not much longer: released early, they rest until past the deadline)
        grant = hog.link(consumer.address).alloc(spec("hog-1", 4), 3.0)
        assert "had no free slots for 0.3s" in expect_and_end(consumer, p, "nc-1", 1)
        assert hog.link(consumer.address).release("hog-1", grant.epoch)
    finally:
        hog.close()
        p.close()


def test_full_staging_reaches_the_waiting_request(consumer):
    hog = make_producer("hog-2")
    p = make_producer("cramped", staging_chunks=1, staging_wait_s=0.2, alloc_timeout_s=60)
    try:
        grant = hog.link(consumer.address).alloc(spec("hog-2", 4), 3.0)  # no lease: chunk 0 stays staged
        assert "staging full for 0.2s" in expect_and_end(consumer, p, "sf-1", 2, stage=2)
        assert hog.link(consumer.address).release("hog-2", grant.epoch)
        assert p.staging.free == p.staging.num_slots
    finally:
        hog.close()
        p.close()


def test_a_queued_request_is_a_sign_of_life_each_time_it_is_announced(consumer):
    p = make_producer("queue")
    try:
        link = p.link(consumer.address)
        assert consumer.call("last_sign", "q-1") == 0.0
        assert link.pending("q-1")
        first = consumer.call("last_sign", "q-1")
        assert first > 0
        assert link.pending("q-1")
        assert consumer.call("last_sign", "q-1") > first  # the timer restarts from the newer sign
    finally:
        p.close()

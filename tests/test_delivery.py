"""Verified delivery between a real producer and consumer (real NIXL, two processes): a transfer proves
what it carries, chunk geometry is agreed, producers cannot end each other's leases, attempts are
separate. (A producer that gives up tells the consumer at once: tests/test_early_failure.py.)"""
from __future__ import annotations

from concurrent.futures import Future

import pytest

from launch.polling import wait_for
from tests.consumer_proc import ConsumerProcess
from tests.test_transfer import CHUNK_TOKENS, LAYOUT, check_landed, finished, make_producer, push, spec
from transfer import wire
from transfer.consumer_link import HandshakeRejected, PeerError
from transfer.notice import ChunkNotice
from transfer.producer import Producer, ProducerSettings
from transfer.states import State


@pytest.fixture(scope="module")
def consumer():
    # fence_timeout_s: the tests that play a producer by hand end its leases without a fence
    c = ConsumerProcess(LAYOUT, chunk_tokens=CHUNK_TOKENS, num_slots=16, quarantine_s=0.3, fence_timeout_s=1.0,
                        expect_wait_s=0.05)
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def pool_returns_full(consumer):
    yield
    consumer.wait_pool_full()


def test_alloc_for_another_prompt_is_refused_and_its_request_fails_at_once(consumer):
    p = make_producer("hostile-hash")
    try:
        consumer.call("expect", ("h-1", 3 * CHUNK_TOKENS, "cd" * 16))  # the request has another prompt
        with pytest.raises(PeerError) as e:
            p.link(consumer.address).alloc(spec("h-1", 3), 5.0)
        assert e.value.code == "refused" and "does not match the request" in str(e.value)
        assert "does not match" in consumer.ended_reason("h-1")
        assert consumer.call("lease", "h-1") is None
    finally:
        p.close()


def test_a_chunk_with_the_wrong_byte_count_fails_the_transfer(consumer):
    p = make_producer("hostile-size")
    try:
        link = p.link(consumer.address)
        consumer.call("expect", ("s-1", 2 * CHUNK_TOKENS, "ab" * 16))
        grant = link.alloc(spec("s-1", 2), 5.0)
        w = link.welcome
        bad = ChunkNotice(transfer_id="s-1", chunk=0, epoch=grant.epoch, incarnation=p.incarnation,
                          nbytes=w.slot_bytes - 1)
        h = p.agent.write(p.staging.region, [(0, grant.offsets[0], w.slot_bytes - 1)], w.agent_name,
                          w.mem_type, w.dev_id, bad.encode())
        wait_for(lambda: p.agent.poll(h) == "DONE", 5, 0.01, "write done")
        p.agent.release(h)
        assert "must hold" in consumer.ended_reason("s-1")
        assert consumer.call("lease", "s-1") is None
    finally:
        p.close()


def test_a_producer_with_other_chunk_geometry_is_refused_naming_both_values(consumer):
    p = Producer(LAYOUT, 2 * CHUNK_TOKENS, ProducerSettings(producer_id="big-chunks"))
    try:
        with pytest.raises(HandshakeRejected) as e:
            p.link(consumer.address).ensure()
        assert f"chunk_tokens={CHUNK_TOKENS}" in str(e.value) and f"chunk_tokens={2 * CHUNK_TOKENS}" in str(e.value)
    finally:
        p.close()


def test_an_older_producer_cannot_end_a_newer_ones_leases_under_the_same_id(consumer):
    old, new = make_producer("same-id"), make_producer("same-id")
    assert new.generation > old.generation
    try:
        crcs = push(new, consumer, "g-1", 2)
        assert finished(new, {"g-1"})["g-1"] == State.SENT
        with pytest.raises(HandshakeRejected) as e:
            old.link(consumer.address).ensure()
        assert "not newer than the live generation" in str(e.value)
        check_landed(consumer, "g-1", crcs)  # the newer producer's lease survived the stale HELLO
    finally:
        old.close()
        new.close()


def test_a_new_attempt_replaces_the_old_one_and_only_its_bytes_land(consumer):
    p = make_producer("preempted")
    try:
        first = p.begin(spec("a-1", 2, attempt=0), consumer.address)
        wait_for(lambda: consumer.call("lease", "a-1"), 5, 0.01, "attempt 0 leased")
        p.abort(first)
        crcs = push(p, consumer, "a-1", 2, attempt=1)
        states = finished(p, {"a-1@0", "a-1@1"})
        assert (states["a-1@0"], states["a-1@1"]) == (State.ABORTED, State.SENT)
        check_landed(consumer, "a-1", crcs)
    finally:
        p.close()


def test_a_request_still_holding_an_ended_pushs_handle_stages_nothing_into_a_later_push_of_its_prompt(consumer):
    """Engine requests with one prompt share its key. One whose push ended (aborted here) still holds that
    push's handle: a chunk it stages must go nowhere, not into the next push of the prompt (that push's staging
    slot would leak and its chunk would be written twice)."""
    p = make_producer("handles")
    try:
        first = p.begin(spec("e-1", 2), consumer.address)
        p.abort(first)
        assert finished(p, {"e-1"})["e-1"] == State.ABORTED
        crcs = push(p, consumer, "e-1", 2)  # another request's push of the same prompt
        assert not p.stage(first, 0, lambda view: view[:8].fill_(7).numel()), "an ended push takes no chunk"
        assert finished(p, {"e-1"})["e-1"] == State.SENT
        check_landed(consumer, "e-1", crcs)
        wait_for(lambda: p.staging.free == p.cfg.staging_chunks, 5, 0.01, "producer staging back to full")
    finally:
        p.close()


def test_a_second_push_of_a_delivered_key_is_ended_without_touching_the_first(consumer):
    """Duplicate prompts share a key: a push that begins after the first one was SENT must neither write into
    its complete lease nor fail it; it ends ABORTED and the first push's bytes are read intact."""
    p = make_producer("repeated")
    try:
        crcs = push(p, consumer, "r-1", 2)
        assert finished(p, {"r-1"})["r-1"] == State.SENT
        again = p.begin(spec("r-1", 2), consumer.address)
        assert again.startswith("r-1@0#")  # the first job is gone: only the consumer can tell
        states = finished(p, {"r-1"})
        assert states["r-1"] == State.ABORTED
        assert consumer.call("status", "r-1") == ("COMPLETE", "")
        check_landed(consumer, "r-1", crcs)
    finally:
        p.close()


def test_a_push_that_ended_but_is_not_cleaned_up_keeps_its_job_against_a_second_begin(consumer):
    """Its staging slots, writes and lease release are its job's: a second begin of the same attempt then is
    refused instead of replacing (and leaking) them."""
    p = make_producer("uncleaned")
    try:
        s = spec("u-1", 1)
        with p._cv:  # a control call still under way holds the ended job in place
            handle = p.begin(s, consumer.address)
            job = p._jobs[handle]
            job.call, job.abort = Future(), True
        wait_for(lambda: job.t.done, 5, 0.01, "the push ended")
        assert p.begin(s, consumer.address) == "" and p._jobs[handle] is job
        job.call.set_result(wire.Ack(ok=True))
        p._wake()
        assert finished(p, {"u-1"})["u-1"] == State.ABORTED
    finally:
        p.close()


def test_each_producer_rank_reaches_only_its_own_consumer_rank():
    """TP=2 on both roles: rank r's producer pushes to rank r's endpoint (listen_port + r); a rank that
    reaches the other rank's endpoint, or a producer with another TP size, is refused with a sentence."""
    ranks = [LAYOUT.model_copy(update={"tp_size": 2, "tp_rank": r, "kv_heads_per_rank": 1}) for r in (0, 1)]
    consumers = [ConsumerProcess(layout, chunk_tokens=CHUNK_TOKENS, num_slots=4) for layout in ranks]
    producers = [Producer(layout, CHUNK_TOKENS, ProducerSettings(producer_id=f"tp-prefill/rank{r}"))
                 for r, layout in enumerate(ranks)]
    try:
        for r in (0, 1):
            assert producers[r].link(consumers[r].address).ensure().layout.tp_rank == r
        with pytest.raises(HandshakeRejected) as e:
            producers[1].link(consumers[0].address).ensure()
        assert "producer rank 1 reached consumer" in str(e.value) and "serves rank 0" in str(e.value)
        tp1 = Producer(LAYOUT, CHUNK_TOKENS, ProducerSettings(producer_id="tp1-prefill"))
        try:
            with pytest.raises(HandshakeRejected) as e:
                tp1.link(consumers[0].address).ensure()
            assert "TP=2, producer TP=1" in str(e.value) and "not supported" in str(e.value)
        finally:
            tp1.close()
    finally:
        for p in producers:
            p.close()
        for c in consumers:
            c.stop()


def test_an_alloc_before_its_decode_request_waits_briefly_then_gets_every_chunk(consumer):
    p = make_producer("early")
    try:
        link = p.link(consumer.address)
        first = link.alloc(spec("e-1", 2), 5.0)
        assert isinstance(first, wire.NoCapacity) and first.retry_after_s <= 0.01
        grant = wait_for(lambda: (g := link.alloc(spec("e-1", 2), 5.0)) and isinstance(g, wire.Grant) and g,
                         2, 0.01, "grant after the wait for the request")
        assert grant.skip_chunks == 0 and len(grant.offsets) == 2
        assert consumer.call("release", "e-1")
    finally:
        p.close()


def test_chunks_the_decode_already_holds_are_not_pushed(consumer):
    """A second chat turn: the decode node's prefix cache holds the first 2 chunks' blocks."""
    p = make_producer("turn-2")
    try:
        before = consumer.call("counters").get("bytes_received", 0)
        consumer.call("expect", ("t2-1", 4 * CHUNK_TOKENS, "ab" * 16, 1, 2))
        crcs = push(p, consumer, "t2-1", 4)
        assert finished(p, {"t2-1"})["t2-1"] == State.SENT
        # SENT means the producer's writes completed; the consumer sees their notices when it next looks
        lease = wait_for(lambda: (got := consumer.call("lease", "t2-1")) and got["complete"] and got, 5, 0.01,
                         "lease complete")
        assert len(lease["slots"]) == 2
        check_landed(consumer, "t2-1", crcs[2:])
        moved = consumer.call("counters")["bytes_received"] - before
        assert moved == 2 * p.geometry.chunk_nbytes(4 * CHUNK_TOKENS, 2)
        assert p.staging.free == p.staging.num_slots
    finally:
        p.close()

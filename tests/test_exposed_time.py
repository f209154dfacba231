"""Exposed transfer time: each pushed chunk's notice says when its KV was ready (producer side, real NIXL), and
the decode's figure runs from the last chunk's stamp to the moment it is observed."""
from __future__ import annotations

import time

import pytest

from launch.polling import wait_for
from pd.exposed_time import EXPOSED_SECONDS, observe_exposed
from tests.consumer_proc import ConsumerProcess
from tests.test_transfer import CHUNK_TOKENS, LAYOUT, check_landed, finished, make_producer, push
from transfer.notice import ChunkNotice, decode_notification
from transfer.states import State


def notice(chunk: int, ready_at: float | None) -> ChunkNotice:
    return ChunkNotice(transfer_id="k", chunk=chunk, epoch=1, incarnation="p1", nbytes=10, kv_ready_at=ready_at)


def histogram_count() -> float:
    return next(s.value for m in EXPOSED_SECONDS.collect() for s in m.samples if s.name.endswith("_count"))


def test_the_stamp_travels_in_the_notice():
    assert decode_notification(notice(0, 1234.5).encode()).kv_ready_at == 1234.5
    assert decode_notification(notice(0, None).encode()).kv_ready_at is None


def test_exposed_time_counts_from_the_last_chunk_ready():
    before = histogram_count()
    assert observe_exposed([notice(0, 100.0), notice(2, 103.0), notice(1, 101.0)], now=103.25) == 0.25
    assert histogram_count() == before + 1


def test_clock_skew_counts_as_zero_and_unstamped_notices_record_nothing():
    before = histogram_count()
    assert observe_exposed([notice(0, 200.0)], now=199.0) == 0.0
    assert observe_exposed([notice(0, None), notice(1, None)], now=300.0) is None
    assert histogram_count() == before + 1


@pytest.fixture(scope="module")
def consumer():
    c = ConsumerProcess(LAYOUT, chunk_tokens=CHUNK_TOKENS, num_slots=8, quarantine_s=0.3, expect_wait_s=0)
    yield c
    c.stop()


def test_pushed_chunks_carry_when_their_kv_was_staged(consumer):
    p = make_producer("stamps")
    try:
        t0 = time.time()
        crcs = push(p, consumer, "stamped", 3)
        t1 = time.time()
        assert finished(p, {"stamped"})["stamped"] == State.SENT
        lease = wait_for(lambda: (got := consumer.call("lease", "stamped")) and got["complete"] and got, 5, 0.01,
                         "lease complete")
        stamps = lease["kv_ready_at"]
        assert len(stamps) == 3 and all(t0 <= s <= t1 for s in stamps) and stamps == sorted(stamps)
        check_landed(consumer, "stamped", crcs)
    finally:
        p.close()
    assert consumer.call("stats").free == 8

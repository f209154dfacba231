"""A lease's fence over real NIXL (two processes): a release that says its writes were given up on their way
frees nothing by itself; the producer's fence, which follows those writes on their connection, does."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from launch.polling import wait_for
from tests.consumer_proc import ConsumerProcess
from tests.test_transfer import CHUNK_TOKENS, LAYOUT, make_producer, spec
from transfer import wire
from transfer.consumer_link import ConsumerLink
from transfer.fence_writes import FenceWrites
from transfer.producer import Producer

QUARANTINE_S = 0.3


def send_fence(p: Producer, w: wire.Welcome, key: str, epoch: int) -> None:
    """The fence of (key, epoch), posted as a producer's push thread posts it, and driven until it is written."""
    fences = FenceWrites(p.agent, p.staging, p.incarnation)
    fences.send(SimpleNamespace(spec=SimpleNamespace(key=key), consumer="test",
                                grant=SimpleNamespace(incarnation=w.incarnation, epoch=epoch)), w)
    wait_for(lambda: fences.poll(time.monotonic()) == 0, 5, 0.01, "the fence written")


def leased(p: Producer, consumer: ConsumerProcess, key: str) -> tuple[ConsumerLink, wire.Grant]:
    """A decode request waiting for `key` (2 chunks), and `p`'s lease on it, asked by hand."""
    link = p.link(consumer.address)
    consumer.call("expect", (key, 2 * CHUNK_TOKENS, "ab" * 16))
    return link, link.alloc(spec(key, 2), 5.0)


@pytest.fixture(scope="module")
def consumer():
    c = ConsumerProcess(LAYOUT, chunk_tokens=CHUNK_TOKENS, num_slots=4, quarantine_s=QUARANTINE_S, expect_wait_s=0)
    yield c
    c.stop()


def test_a_release_after_writes_were_given_up_waits_for_the_producers_fence(consumer):
    p = make_producer("gave-up-writes")
    try:
        link, grant = leased(p, consumer, "gw-1")
        assert link.release("gw-1", grant.epoch, "writes failed", writes_done=False)
        assert "producer gave up" in consumer.ended_reason("gw-1")
        time.sleep(3 * QUARANTINE_S)
        assert consumer.call("stats").quarantined == 2, "the release alone must not free slots writes may reach"
        send_fence(p, link.welcome, "gw-1", grant.epoch)
        consumer.wait_pool_full(timeout_s=5)
        assert consumer.call("counters")["fences_received"] == 1
    finally:
        p.close()


def test_a_release_whose_writes_are_done_frees_the_slots_after_quarantine_s(consumer):
    p = make_producer("writes-done")
    try:
        link, grant = leased(p, consumer, "wd-1")
        assert link.release("wd-1", grant.epoch, "preempted")
        consumer.wait_pool_full(timeout_s=5)
    finally:
        p.close()

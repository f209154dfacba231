"""When the slots of a lease that ended unfilled come back (transfer/quarantine.py), with a fake clock.

A write posted before a link was cut lands when the link comes back, however late; its producer's fence follows
it on the same connection. So such a lease waits for the fence (then `quarantine_s`), for its producer's word
before the deadline, or for its producer's restart; otherwise `fence_timeout_s` past its deadline, or as long as its
producer's TCP may hold a write (transfer/write_hold.py) if that is longer.
"""
from __future__ import annotations

import logging

import msgpack
import pytest

from tests.test_slot_pool import Clock, notice, sizes
from transfer.notice import ChunkNotice, LeaseFence, NoticeError, decode_notification
from transfer.notice_intake import NoticeIntake
from transfer.receive_book import ReceiveBook
from transfer.slot_pool import SlotPool


def pool_at(clock: Clock, n: int = 2) -> SlotPool:
    return SlotPool(n, 100, quarantine_s=2.0, fence_timeout_s=30.0, clock=clock)


@pytest.mark.parametrize("hold,rest", [(0.0, 30.0), (100.0, 100.0)], ids=["no_hold", "tcp_holds_longer"])
def test_an_expired_lease_whose_producer_said_nothing_rests_the_longer_of_fence_timeout_s_and_its_hold(hold, rest):
    """The producer may be cut off with its writes queued: `quarantine_s` past the deadline is not enough, and its
    host's TCP may land them up to `write_hold_s` past it (transfer/write_hold.py)."""
    clock = Clock()
    pool = pool_at(clock)
    pool.grant("a", sizes(2), ttl_s=1.0, producer="p1", write_hold_s=hold)
    clock.t = 1.0
    assert pool.stats().expired_total == 1
    clock.t = 1.0 + rest - 0.1
    assert pool.stats().quarantined == 2 and pool.grant("b", sizes(1), 1.0, "p1") is None
    clock.t = 1.0 + rest + 0.1
    assert pool.stats().free == 2


def test_a_fence_still_ends_a_long_hold_quarantine_s_after_it():
    clock = Clock()
    pool = pool_at(clock)
    lease = pool.grant("a", sizes(2), ttl_s=1.0, producer="p1", write_hold_s=1000.0)
    clock.t = 5.0
    assert pool.stats().quarantined == 2
    assert pool.fence("a", lease.epoch, "p1")
    clock.t = 6.9
    assert pool.stats().quarantined == 2
    clock.t = 7.1
    assert pool.stats().free == 2


def test_a_restart_ends_a_long_hold_one_retransmission_timeout_after_the_new_hello():
    """The old connection may still hold writes; the new hello shows the link is back, and TCP retransmits within
    RTO_MAX_S (120 s) from then. A producer with no hold (a loopback consumer's) rests quarantine_s as before."""
    clock = Clock()
    pool = pool_at(clock, 4)
    pool.grant("a", sizes(2), ttl_s=1.0, producer="p1", write_hold_s=1000.0)
    pool.grant("b", sizes(2), ttl_s=1.0, producer="p2")
    clock.t = 5.0
    assert pool.stats().quarantined == 4
    pool.release_producer("p1", restarted=True)  # a newer generation of each said hello
    pool.release_producer("p2", restarted=True)
    clock.t = 7.1
    assert pool.stats().quarantined == 2  # p2's: quarantine_s
    clock.t = 5.0 + 120.0 + 2.0 - 0.1
    assert pool.stats().quarantined == 2
    clock.t = 5.0 + 120.0 + 2.0 + 0.1
    assert pool.stats().free == 4


def test_a_fence_frees_an_ended_lease_quarantine_s_after_it_comes_even_long_past_its_deadline():
    clock = Clock()
    pool = pool_at(clock)
    lease = pool.grant("a", sizes(2), ttl_s=1.0, producer="p1")
    clock.t = 1.0
    assert pool.stats().quarantined == 2
    clock.t = 20.0  # the link came back: the queued writes landed, then the fence
    assert pool.fence("a", lease.epoch, "p1")
    clock.t = 21.9
    assert pool.stats().quarantined == 2
    clock.t = 22.1
    assert pool.stats().free == 2 and pool.resting("a", lease.epoch) is None


def test_a_release_that_comes_after_the_deadline_shortens_nothing():
    """The control channel reconnects on its own: after a cut, the release can come before the writes the data
    connection still holds. Before the deadline it counts as before (the producer was in touch)."""
    clock = Clock()
    pool = pool_at(clock, 3)
    lease = pool.grant("a", sizes(2), ttl_s=1.0, producer="p1")
    clock.t = 5.0
    assert pool.release("a", lease.epoch, producer_stopped=True)  # past the deadline, not yet seen expired
    assert pool.stopped("a", lease.epoch)  # found, but too late to count
    clock.t = 8.0
    assert pool.stats().quarantined == 2
    early = pool.grant("b", sizes(1), ttl_s=10.0, producer="p1")
    assert pool.release("b") and pool.stopped("b", early.epoch)  # ended early, then the producer's word in time
    clock.t = 10.1
    assert pool.stats().quarantined == 2 and pool.resting("b", early.epoch) is None


def test_a_fence_that_comes_while_the_lease_is_live_counts_when_it_ends():
    clock = Clock()
    pool = pool_at(clock)
    lease = pool.grant("a", sizes(2), ttl_s=1.0, producer="p1")
    assert pool.fence("a", lease.epoch, "p1") and pool.live("a") is lease  # a fence ends nothing by itself
    clock.t = 1.5  # expired: its fence already came
    assert pool.stats().quarantined == 2
    clock.t = 3.6
    assert pool.stats().free == 2


def test_a_fence_of_another_producer_or_epoch_frees_nothing():
    clock = Clock()
    pool = pool_at(clock)
    lease = pool.grant("a", sizes(2), ttl_s=1.0, producer="p1")
    clock.t = 2.0
    assert not pool.fence("a", lease.epoch, "p2") and not pool.fence("a", lease.epoch + 1, "p1")
    clock.t = 10.0
    assert pool.stats().quarantined == 2


def test_a_pinned_lease_fenced_meanwhile_rests_quarantine_s_after_its_last_unpin():
    clock = Clock()
    pool = pool_at(clock)
    lease = pool.grant("a", sizes(4), ttl_s=1.0, producer="p1", window=2)
    assert pool.accept(notice("a", 0, lease.epoch)) == ""
    pool.take_front("a", lease.epoch)
    assert pool.release("a")
    clock.t = 5.0
    assert pool.fence("a", lease.epoch, "p1")
    pool.free_front(lease, 1)  # the last pin goes
    clock.t = 6.9
    assert pool.stats().quarantined == 2
    clock.t = 7.1
    assert pool.stats().free == 2


def test_a_restarted_producers_leases_do_not_wait_for_its_fence_and_a_silent_ones_do():
    clock = Clock()
    pool = pool_at(clock, 4)
    pool.grant("resting", sizes(1), ttl_s=1.0, producer="old")
    pool.grant("live", sizes(1), ttl_s=10.0, producer="old")
    pool.grant("silent", sizes(2), ttl_s=10.0, producer="quiet")
    clock.t = 1.0
    assert pool.stats().expired_total == 1  # "resting" ended at its deadline
    clock.t = 5.0
    assert pool.release_producer("old", restarted=True) == 1  # a newer generation said hello
    assert pool.release_producer("quiet") == 1  # forgotten for silence: it may only be cut off
    clock.t = 7.1  # the ended one rests quarantine_s from the restart; the live one rests until past its deadline
    s = pool.stats()
    assert (s.free, s.quarantined) == (1, 3)
    clock.t = 12.1
    s = pool.stats()
    assert (s.free, s.quarantined) == (2, 2)


class Registry:
    def __init__(self, agents: dict[str, str]) -> None:
        self.agents = agents

    def agent_of(self, incarnation: str) -> str | None:
        return self.agents.get(incarnation)


def test_a_fence_counts_only_from_the_agent_of_the_producer_it_names(caplog):
    clock = Clock()
    pool = pool_at(clock)
    book = ReceiveBook(pool, unclaimed_ttl_s=30.0, clock=clock)
    intake = NoticeIntake(pool, book, Registry({"p1": "agent-p1"}), unclaimed_ttl_s=30.0)
    lease = pool.grant("a", sizes(2), ttl_s=1.0, producer="p1")
    clock.t = 2.0
    fence = LeaseFence(transfer_id="a", epoch=lease.epoch, incarnation="p1").encode()
    with caplog.at_level(logging.WARNING, logger="kvbridge.consumer"):
        assert intake.take("agent-p2", fence) is False
    assert "not the agent of producer p1" in caplog.text and book.snapshot()["fences_dropped"] == 1
    clock.t = 10.0
    assert pool.stats().quarantined == 2
    intake.take("agent-p1", fence)
    clock.t = 12.1
    assert pool.stats().free == 2 and book.snapshot()["fences_received"] == 1


def test_a_fence_round_trips_and_is_told_apart_from_a_chunk_notice():
    fence = LeaseFence(transfer_id="a", epoch=3, incarnation="p1")
    assert decode_notification(fence.encode()) == fence
    chunk = ChunkNotice(transfer_id="a", chunk=0, epoch=3, incarnation="p1", nbytes=10)
    assert decode_notification(chunk.encode()) == chunk
    for bad in (dict(chunk.model_dump(), fence=True), dict(fence.model_dump(), fence=False)):
        try:
            decode_notification(msgpack.packb(bad))
        except NoticeError:
            continue
        raise AssertionError(f"{bad} was taken for a notification")


def test_a_restarted_producers_live_lease_still_rests_until_past_its_deadline():
    """Two generations may overlap (a rolling restart): the old one writes until it learns of the end, never
    past the deadline it was told."""
    clock = Clock()
    pool = pool_at(clock)
    pool.grant("a", sizes(2), ttl_s=10.0, producer="old")
    clock.t = 1.0
    pool.release_producer("old", restarted=True)
    clock.t = 11.9
    assert pool.stats().quarantined == 2
    clock.t = 12.1
    assert pool.stats().free == 2


def test_a_push_after_a_fenced_one_of_the_same_key_gets_a_new_lease_not_the_fenced_one():
    """A late fence of the first push names (key, epoch, producer): had the lease been handed back, it would
    shorten the rest of slots the second push writes."""
    clock = Clock()
    pool = pool_at(clock, 4)
    first = pool.grant("a", sizes(2), ttl_s=10.0, producer="p1")
    assert pool.fence("a", first.epoch, "p1")
    second = pool.grant("a", sizes(2), ttl_s=10.0, producer="p1")
    assert second is not first and second.epoch > first.epoch and not second.fenced

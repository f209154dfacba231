"""Slot pool leases with a fake clock: expiry, quarantine, idempotent release, fail-closed acceptance,
exact chunk sizes, attempts, pins."""
from __future__ import annotations

from transfer.notice import ChunkNotice
from transfer.receive_book import ReceiveBook
from transfer.slot_pool import LeaseInUse, SlotPool


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def notice(tid: str, chunk: int, epoch: int, inc: str = "p1", nbytes: int = 10) -> ChunkNotice:
    return ChunkNotice(transfer_id=tid, chunk=chunk, epoch=epoch, incarnation=inc, nbytes=nbytes)


def sizes(n: int) -> list[int]:
    return [10] * n


def test_expired_slots_are_quarantined_before_reuse():
    clock = Clock()
    pool = SlotPool(4, 100, quarantine_s=2.0, fence_timeout_s=2.0, clock=clock)
    lease = pool.grant("a", sizes(3), ttl_s=1.0, producer="p1")
    assert pool.grant("b", sizes(2), 1.0, "p1") is None  # only 1 free
    clock.t = 1.5
    s = pool.stats()
    assert (s.free, s.used, s.quarantined, s.expired_total) == (1, 0, 3, 1)
    assert pool.grant("b", sizes(2), 1.0, "p1") is None  # quarantined slots are not handed out
    assert "lease has ended" in pool.accept(notice("a", 0, lease.epoch))  # the late chunk is dropped and counted
    assert pool.stats().dropped_total == 1
    clock.t = 3.6
    b = pool.grant("b", sizes(2), 1.0, "p1")
    assert b is not None and b.epoch > lease.epoch


def test_release_is_idempotent_and_complete_leases_free_at_once():
    pool = SlotPool(2, 100, quarantine_s=5.0, clock=Clock())
    lease = pool.grant("a", sizes(2), 10.0, "p1")
    assert pool.accept(notice("a", 0, lease.epoch)) == "" and pool.accept(notice("a", 1, lease.epoch)) == ""
    assert pool.live("a").complete
    assert pool.release("a") and not pool.release("a")
    assert pool.stats().free == 2


def test_wrong_epoch_incarnation_or_index_is_refused():
    pool = SlotPool(2, 100, clock=Clock())
    lease = pool.grant("a", sizes(1), 10.0, "p1")
    assert "no lease" in pool.accept(notice("a", 0, lease.epoch + 1))
    assert "no lease" in pool.accept(notice("a", 0, lease.epoch, inc="p2"))
    assert "outside" in pool.accept(notice("a", 1, lease.epoch))
    assert "no lease" in pool.accept(notice("zzz", 0, lease.epoch))
    assert pool.stats().dropped_total == 4 and not pool.live("a").arrived


def test_restarted_producer_leases_end():
    pool = SlotPool(3, 100, quarantine_s=0.0, clock=Clock())
    pool.grant("a", sizes(2), 10.0, "old")
    pool.grant("b", sizes(1), 10.0, "new")
    assert pool.release_producer("old") == 1
    assert pool.live("a") is None and pool.live("b") is not None


def test_a_chunk_must_hold_exactly_the_bytes_of_its_index():
    pool = SlotPool(3, 100, clock=Clock())
    lease = pool.grant("a", [100, 100, 40], 10.0, "p1")
    assert "must hold 100" in pool.accept(notice("a", 0, lease.epoch, nbytes=99))
    assert "must hold 40" in pool.accept(notice("a", 2, lease.epoch, nbytes=100))
    assert pool.accept(notice("a", 2, lease.epoch, nbytes=40)) == ""
    assert pool.stats().dropped_total == 2 and not pool.live("a").complete


def test_a_chunk_larger_than_a_slot_is_never_granted():
    pool = SlotPool(2, 100, clock=Clock())
    try:
        pool.grant("a", [101], 10.0, "p1")
    except ValueError as e:
        assert "100-byte slots" in str(e)
    else:
        raise AssertionError("a 101-byte chunk was granted a 100-byte slot")
    assert pool.stats().free == 2


def test_a_new_attempt_ends_the_old_lease_and_its_chunks_are_refused():
    pool = SlotPool(4, 100, quarantine_s=1.0, clock=Clock())
    first = pool.grant("a", sizes(2), 10.0, "p1", attempt=0)
    assert pool.grant("a", sizes(2), 10.0, "p1", attempt=0) is first  # a lost reply, asked again
    second = pool.grant("a", sizes(2), 10.0, "p1", attempt=1)
    assert second.epoch != first.epoch and not set(second.slots) & set(first.slots)
    assert "lease has ended" in pool.accept(notice("a", 0, first.epoch)) and not second.arrived
    assert pool.stats().quarantined == 2


def test_a_pinned_lease_keeps_its_slots_until_the_last_unpin():
    clock = Clock()
    pool = SlotPool(2, 100, quarantine_s=0.0, clock=clock)
    lease = pool.grant("a", sizes(2), 1.0, "p1")
    assert pool.pin("a") is None  # incomplete leases cannot be read
    for c in range(2):
        pool.accept(notice("a", c, lease.epoch))
    assert pool.pin("a") is lease and pool.pin("a") is lease
    clock.t = 5.0  # past the deadline: a pinned lease does not expire
    assert pool.live("a") is lease
    assert pool.release("a")  # a cancel while two readers scatter
    assert pool.stats().free == 0 and pool.grant("b", sizes(1), 1.0, "p1") is None
    pool.unpin(lease, release=False)
    assert pool.stats().free == 0
    pool.unpin(lease, release=True)
    assert pool.stats().free == 2


def test_a_request_that_stopped_waiting_refuses_its_late_producer():
    """EXPIRED (no sign of the transfer within the load timeout: the request recomputes) is final for the key:
    a producer that shows up later is refused, not leased slots nobody will claim."""
    book = ReceiveBook(SlotPool(4, 100, clock=Clock()), unclaimed_ttl_s=30.0, clock=Clock())
    book.expect("late", 30, "ab")
    book.finish("late", None, {"state": "EXPIRED", "reason": "no sign of the transfer for 4.0s"})
    assert "stopped waiting" in book.check_alloc("late", 30, "ab")
    book.expect("on-time", 30, "ab")
    book.finish("on-time", None, {"state": "ABORTED", "reason": "preempted"})  # a new attempt may follow
    assert book.check_alloc("on-time", 30, "ab") == ""


def test_a_second_push_of_a_lease_that_took_chunks_is_refused_not_handed_its_slots():
    """Only a lost reply gets its lease back: once chunks arrived, the same producer and attempt asking again is
    a second push, whose writes would land in slots the first one's reader frees at once."""
    pool = SlotPool(4, 100, quarantine_s=2.0, clock=Clock())
    lease = pool.grant("a", sizes(2), 10.0, "p1")
    assert pool.grant("a", sizes(2), 10.0, "p1") is lease  # nothing arrived yet: a lost reply
    pool.accept(notice("a", 0, lease.epoch))
    try:
        pool.grant("a", sizes(2), 10.0, "p1")
    except LeaseInUse as e:
        assert e.transfer_id == "a" and "1 of 2 chunks arrived" in str(e)
    else:
        raise AssertionError("a lease that took a chunk was handed to a second push")
    assert pool.live("a") is lease and pool.stats().free == 2


def test_slots_of_a_lease_ended_early_stay_quarantined_until_past_its_deadline():
    """A cancel (or a failure) ends a lease whose producer hears of it only at its next renewal and may write
    until the deadline it was told: with no word from it, the slots come back `fence_timeout_s` after that
    deadline, not after the end."""
    clock = Clock()
    pool = SlotPool(2, 100, quarantine_s=2.0, fence_timeout_s=2.0, clock=clock)
    lease = pool.grant("a", sizes(2), ttl_s=10.0, producer="p1")
    pool.accept(notice("a", 0, lease.epoch))
    clock.t = 1.0
    assert pool.release("a")  # ended early, one chunk still due
    clock.t = 11.9  # past the end + 2 s, before the deadline + 2 s
    assert pool.stats().quarantined == 2 and pool.grant("b", sizes(1), 1.0, "p1") is None
    clock.t = 12.1
    assert pool.stats().free == 2


def test_a_read_window_ended_early_returns_its_slots_only_past_its_deadline():
    """A windowed lease cancelled while its reader holds a pin: at the last unpin its producer may still be
    writing the next chunks, so the slots wait for its deadline too."""
    clock = Clock()
    pool = SlotPool(2, 100, quarantine_s=2.0, fence_timeout_s=2.0, clock=clock)
    lease = pool.grant("a", sizes(4), ttl_s=10.0, producer="p1", window=2)
    pool.accept(notice("a", 0, lease.epoch))
    _, taken = pool.take_front("a", lease.epoch)
    assert taken == [0] and pool.release("a")
    clock.t = 5.0
    pool.free_front(lease, 1)  # the scatter is done: the last pin goes
    assert pool.stats().quarantined == 2
    clock.t = 11.9
    assert pool.stats().quarantined == 2
    clock.t = 12.1
    assert pool.stats().free == 2


def test_a_lease_its_producer_releases_early_rests_quarantine_s_from_then_not_past_its_deadline():
    """The producer's own release says it writes no more: only writes it posted before can still land."""
    clock = Clock()
    pool = SlotPool(2, 100, quarantine_s=2.0, clock=clock)
    lease = pool.grant("a", sizes(2), ttl_s=10.0, producer="p1")
    pool.accept(notice("a", 0, lease.epoch))
    clock.t = 1.0
    assert pool.release("a", lease.epoch, producer_stopped=True)
    clock.t = 2.9
    assert pool.stats().quarantined == 2
    clock.t = 3.1
    assert pool.stats().free == 2


def test_a_cancelled_lease_whose_producer_then_says_it_stopped_comes_back_quarantine_s_after_that():
    """The router cancels (the consumer ends the lease: its slots would rest past the deadline), then the
    prefill's abort reaches its producer, which releases: from then on only `quarantine_s`. A stop for another
    epoch shortens nothing."""
    clock = Clock()
    pool = SlotPool(2, 100, quarantine_s=2.0, clock=clock)
    lease = pool.grant("a", sizes(2), ttl_s=10.0, producer="p1")
    assert pool.release("a") and pool.resting("a", lease.epoch) is lease and pool.resting("a", lease.epoch + 1) is None
    clock.t = 1.0
    assert not pool.stopped("a", lease.epoch + 1) and pool.stopped("a", lease.epoch)
    clock.t = 2.9
    assert pool.stats().quarantined == 2
    clock.t = 3.1
    assert pool.stats().free == 2 and pool.resting("a", lease.epoch) is None


def test_a_pinned_lease_cancelled_then_stopped_by_its_producer_rests_quarantine_s_after_its_last_unpin():
    clock = Clock()
    pool = SlotPool(2, 100, quarantine_s=2.0, clock=clock)
    lease = pool.grant("a", sizes(4), ttl_s=10.0, producer="p1", window=2)
    pool.accept(notice("a", 0, lease.epoch))
    pool.take_front("a", lease.epoch)
    assert pool.release("a") and pool.stopped("a", lease.epoch)
    clock.t = 1.0
    pool.free_front(lease, 1)  # the last pin goes
    clock.t = 2.9
    assert pool.stats().quarantined == 2
    clock.t = 3.1
    assert pool.stats().free == 2


def test_a_lost_reply_asked_again_gets_its_lease_with_the_deadline_the_new_reply_states():
    """The second reply tells the producer ttl_s from now: the consumer's deadline (which its quarantine counts
    from) must not be earlier than what the producer was told."""
    clock = Clock()
    pool = SlotPool(2, 100, quarantine_s=2.0, clock=clock)
    lease = pool.grant("a", sizes(1), ttl_s=5.0, producer="p1")
    clock.t = 3.0
    assert pool.grant("a", sizes(1), ttl_s=5.0, producer="p1") is lease and lease.deadline == 8.0


def test_a_lease_cancelled_before_its_last_notices_were_read_is_free_once_they_come():
    """A push that wrote every chunk before the consumer ended its lease (a cancel racing the notices): each chunk
    is written once and its notice follows its bytes, so once all are in nothing is left to land there."""
    clock = Clock()
    pool = SlotPool(2, 100, quarantine_s=2.0, clock=clock)
    lease = pool.grant("a", sizes(2), ttl_s=10.0, producer="p1")
    assert pool.accept(notice("a", 0, lease.epoch)) == ""
    assert pool.release("a")  # cancelled with chunk 1 still due
    assert "lease has ended" in pool.accept(notice("a", 1, lease.epoch))  # dropped (nobody reads it), yet counted
    s = pool.stats()
    assert (s.free, s.quarantined, s.dropped_total) == (2, 0, 1)


def test_a_late_notice_from_another_producer_or_epoch_does_not_end_a_quarantine():
    clock = Clock()
    pool = SlotPool(2, 100, quarantine_s=2.0, clock=clock)
    lease = pool.grant("a", sizes(1), ttl_s=10.0, producer="p1")
    assert pool.release("a")
    assert "no lease" in pool.accept(notice("a", 0, lease.epoch, inc="p2"))
    assert "no lease" in pool.accept(notice("a", 0, lease.epoch + 1))
    assert "has 11 bytes" in pool.accept(notice("a", 0, lease.epoch, nbytes=11))
    assert pool.stats().quarantined == 1


def test_a_window_ended_early_is_not_freed_by_the_chunks_its_window_held():
    """Chunks past the open window are still due: the producer may write them once it hears of a freed slot."""
    clock = Clock()
    pool = SlotPool(2, 100, quarantine_s=2.0, clock=clock)
    lease = pool.grant("a", sizes(4), ttl_s=10.0, producer="p1", window=2)
    assert pool.release("a")
    for c in (0, 1):
        assert "lease has ended" in pool.accept(notice("a", c, lease.epoch))
    assert "outside the open window" in pool.accept(notice("a", 2, lease.epoch))
    assert pool.stats().quarantined == 2


def test_a_pinned_lease_ended_early_whose_chunks_then_all_land_is_free_at_its_last_unpin():
    clock = Clock()
    pool = SlotPool(2, 100, quarantine_s=2.0, clock=clock)
    lease = pool.grant("a", sizes(3), ttl_s=10.0, producer="p1", window=2)
    assert pool.accept(notice("a", 0, lease.epoch)) == ""
    _, taken = pool.take_front("a", lease.epoch)
    assert taken == [0] and pool.release("a")  # cancelled while its reader scatters chunk 0
    assert "lease has ended" in pool.accept(notice("a", 1, lease.epoch))
    pool.free_front(lease, 1)  # the last pin goes: chunk 2 may land now (slot 0 is open to it)
    assert pool.stats().quarantined == 2
    assert "lease has ended" in pool.accept(notice("a", 2, lease.epoch))
    assert pool.stats().free == 2


def test_a_lease_is_under_way_from_its_first_chunk_until_its_last():
    pool = SlotPool(4, 100, clock=Clock())
    lease = pool.grant("a", sizes(2), 10.0, "p1")
    assert pool.receiving() and not pool.under_way()  # granted, nothing written yet
    assert pool.accept(notice("a", 0, lease.epoch)) == ""
    assert pool.under_way()
    assert pool.accept(notice("a", 1, lease.epoch)) == ""
    assert not pool.under_way() and not pool.receiving()  # complete: waits for no more


def test_a_windowed_lease_stays_under_way_while_its_window_was_read_and_freed_and_more_chunks_are_due():
    pool = SlotPool(2, 100, clock=Clock())
    lease = pool.grant("a", sizes(4), ttl_s=10.0, producer="p1", window=2)
    pool.accept(notice("a", 0, lease.epoch))
    pool.take_front("a", lease.epoch)
    pool.free_front(lease, 1)  # chunk 0 scattered: its slot takes chunk 2
    assert not lease.arrived and pool.under_way()

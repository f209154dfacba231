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
    pool = SlotPool(4, 100, quarantine_s=2.0, clock=clock)
    lease = pool.grant("a", sizes(3), ttl_s=1.0, producer="p1")
    assert pool.grant("b", sizes(2), 1.0, "p1") is None  # only 1 free
    clock.t = 1.5
    s = pool.stats()
    assert (s.free, s.used, s.quarantined, s.expired_total) == (1, 0, 3, 1)
    assert pool.grant("b", sizes(2), 1.0, "p1") is None  # quarantined slots are not handed out
    assert "no live lease" in pool.accept(notice("a", 0, lease.epoch))  # the late chunk is dropped and counted
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
    assert "no live lease" in pool.accept(notice("a", 0, lease.epoch + 1))
    assert "no live lease" in pool.accept(notice("a", 0, lease.epoch, inc="p2"))
    assert "outside" in pool.accept(notice("a", 1, lease.epoch))
    assert "no live lease" in pool.accept(notice("zzz", 0, lease.epoch))
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
    assert "no live lease" in pool.accept(notice("a", 0, first.epoch))
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

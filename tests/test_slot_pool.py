"""Slot pool leases with a fake clock: expiry, quarantine, idempotent release, fail-closed acceptance."""
from __future__ import annotations

from transfer.notice import ChunkNotice
from transfer.slot_pool import SlotPool


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def notice(tid: str, chunk: int, epoch: int, inc: str = "p1") -> ChunkNotice:
    return ChunkNotice(transfer_id=tid, chunk=chunk, epoch=epoch, incarnation=inc, nbytes=10)


def test_expired_slots_are_quarantined_before_reuse():
    clock = Clock()
    pool = SlotPool(4, 100, quarantine_s=2.0, clock=clock)
    lease = pool.grant("a", 3, ttl_s=1.0, producer="p1")
    assert pool.grant("b", 2, 1.0, "p1") is None  # only 1 free
    clock.t = 1.5
    s = pool.stats()
    assert (s.free, s.used, s.quarantined, s.expired_total) == (1, 0, 3, 1)
    assert pool.grant("b", 2, 1.0, "p1") is None  # quarantined slots are not handed out
    assert not pool.accept(notice("a", 0, lease.epoch))  # the late chunk is dropped and counted
    assert pool.stats().dropped_total == 1
    clock.t = 3.6
    b = pool.grant("b", 2, 1.0, "p1")
    assert b is not None and b.epoch > lease.epoch


def test_release_is_idempotent_and_complete_leases_free_at_once():
    pool = SlotPool(2, 100, quarantine_s=5.0, clock=Clock())
    lease = pool.grant("a", 2, 10.0, "p1")
    assert pool.accept(notice("a", 0, lease.epoch)) and pool.accept(notice("a", 1, lease.epoch))
    assert pool.live("a").complete
    assert pool.release("a") and not pool.release("a")
    assert pool.stats().free == 2


def test_wrong_epoch_incarnation_or_index_is_refused():
    pool = SlotPool(2, 100, clock=Clock())
    lease = pool.grant("a", 1, 10.0, "p1")
    assert not pool.accept(notice("a", 0, lease.epoch + 1))
    assert not pool.accept(notice("a", 0, lease.epoch, inc="p2"))
    assert not pool.accept(notice("a", 1, lease.epoch))
    assert not pool.accept(notice("zzz", 0, lease.epoch))
    assert pool.stats().dropped_total == 4 and not pool.live("a").arrived


def test_restarted_producer_leases_end():
    pool = SlotPool(3, 100, quarantine_s=0.0, clock=Clock())
    pool.grant("a", 2, 10.0, "old")
    pool.grant("b", 1, 10.0, "new")
    assert pool.release_producer("old") == 1
    assert pool.live("a") is None and pool.live("b") is not None

"""An ALLOC its producer never heard answered holds no slots for long (transfer/withdrawals.py, lease_desk.py).

A cut link can deliver an ALLOC after its producer's call timed out and the transfer was given up: the lease it
gets is written by nobody and released by nobody, and no fence comes for it. The producer withdraws the ALLOC
once the consumer is reachable again; the withdrawal may come after the ALLOC or before it (the ALLOC on the
old connection, the withdrawal on a new one). Fake clocks throughout.
"""
from __future__ import annotations

from tests.test_slot_pool import Clock, notice, sizes
from tests.test_transfer import CHUNK_TOKENS, LAYOUT, spec
from transfer import wire
from transfer.geometry import ChunkGeometry
from transfer.lease_desk import LeaseDesk
from transfer.receive_book import ReceiveBook
from transfer.slot_pool import SlotPool
from transfer.withdrawals import GIVE_UP_S, RETRY_S, UnansweredAllocs, Unreachable


def pool_at(clock: Clock, n: int = 4) -> SlotPool:
    return SlotPool(n, ChunkGeometry(LAYOUT, CHUNK_TOKENS).slot_bytes, quarantine_s=2.0, fence_timeout_s=30.0,
                    clock=clock)


def desk_of(pool: SlotPool) -> LeaseDesk:
    return LeaseDesk(pool, ReceiveBook(pool, 30.0), ChunkGeometry(LAYOUT, CHUNK_TOKENS), 0, 0, 0.0, "c-inc")


def alloc(key: str, alloc_id: int, producer: str = "p1", attempt: int = 0) -> wire.Alloc:
    s = spec(key, 2)
    return wire.Alloc(incarnation=producer, transfer_id=key, num_tokens=s.num_tokens, token_hash=s.token_hash,
                      ttl_s=5, alloc_id=alloc_id, attempt=attempt)


def test_a_lease_answered_to_nobody_rests_quarantine_s_after_its_withdrawal_not_fence_timeout_s():
    clock = Clock()
    pool = pool_at(clock)
    desk = desk_of(pool)
    assert isinstance(desk.alloc(alloc("a", 7)), wire.Grant)  # the late ALLOC: its answer goes nowhere
    clock.t = 1.0
    desk.withdraw(wire.Withdraw(incarnation="p1", transfer_id="a", alloc_id=7))
    assert pool.live("a") is None and pool.stats().quarantined == 2 and desk.book.snapshot()["allocs_withdrawn"] == 1
    clock.t = 3.1  # quarantine_s after it, long before the lease's deadline + fence_timeout_s (35 s)
    assert pool.stats().free == 4


def test_a_withdrawal_that_comes_first_refuses_the_late_alloc():
    clock = Clock()
    pool = pool_at(clock)
    desk = desk_of(pool)
    desk.withdraw(wire.Withdraw(incarnation="p1", transfer_id="a", alloc_id=7))
    refused = desk.alloc(alloc("a", 7))
    assert isinstance(refused, wire.Error) and refused.code == "withdrawn" and pool.stats().free == 4
    assert isinstance(desk.alloc(alloc("a", 8)), wire.Grant)  # the producer's next push of the key is served
    assert desk.book.snapshot()["allocs_refused_withdrawn"] == 1


def test_a_late_alloc_of_an_older_attempt_cannot_end_the_newer_attempts_lease_once_withdrawn():
    """An ALLOC of another attempt replaces the lease it finds: the late one, withdrawn first, is refused."""
    clock = Clock()
    pool = pool_at(clock)
    desk = desk_of(pool)
    newer = desk.alloc(alloc("a", 8, attempt=1))
    assert isinstance(newer, wire.Grant)
    desk.withdraw(wire.Withdraw(incarnation="p1", transfer_id="a", alloc_id=7))
    assert isinstance(desk.alloc(alloc("a", 7, attempt=0)), wire.Error)
    assert pool.live("a").epoch == newer.epoch


def test_a_withdrawal_never_ends_a_lease_another_alloc_was_answered_with():
    """The same prompt pushed again by the same producer asks for the same lease (a lost reply's retry gets it
    back): once a second ALLOC was answered with it, someone may write there."""
    clock = Clock()
    pool = pool_at(clock)
    first = pool.grant("a", sizes(2), ttl_s=5.0, producer="p1", alloc_id=7)
    assert pool.grant("a", sizes(2), ttl_s=5.0, producer="p1", alloc_id=9) is first
    assert pool.withdraw("a", "p1", 7) == "kept" and pool.live("a") is first
    assert pool.withdraw("a", "p1", 9) == "ended" and pool.live("a") is None  # both withdrawn: nobody writes there


def test_a_withdrawal_names_its_producer_and_spares_a_lease_chunks_arrived_in():
    clock = Clock()
    pool = pool_at(clock)
    lease = pool.grant("a", sizes(2), ttl_s=5.0, producer="p1", alloc_id=7)
    assert pool.withdraw("a", "p2", 7) == "" and pool.live("a") is lease
    assert pool.accept(notice("a", 0, lease.epoch)) == ""  # p1 wrote here: it heard the answer after all
    assert pool.withdraw("a", "p1", 7) == "kept" and pool.live("a") is lease


def test_the_producer_withdraws_each_unanswered_alloc_once_reachable_and_gives_up_after_give_up_s():
    clock = Clock()
    pending = UnansweredAllocs(clock)
    pending.add("a", 1)
    pending.add("b", 2)
    sent: list[tuple[str, int]] = []

    def unreachable(key: str, alloc_id: int) -> None:
        raise Unreachable("cut")

    assert pending.claim() and not pending.claim()  # one pass at a time
    pending.withdraw_all(unreachable)
    assert len(pending) == 2 and not pending.claim()  # retried RETRY_S later, not in a loop
    clock.t = RETRY_S
    assert pending.claim()
    pending.withdraw_all(lambda key, alloc_id: sent.append((key, alloc_id)))
    assert sent == [("a", 1), ("b", 2)] and len(pending) == 0 and not pending.claim()
    pending.add("c", 3)
    clock.t += GIVE_UP_S + 1
    assert pending.claim()
    pending.withdraw_all(unreachable)  # past GIVE_UP_S: the consumer's own timeouts freed it by now
    assert len(pending) == 0

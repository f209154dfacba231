"""How the consumer answers ALLOC and PROGRESS: how many slots a transfer gets, and in which order.

A transfer gets at most `window_slots` slots. One carrying more chunks than that streams through its
window: chunk i lands in window slot i mod W once the decode request has scattered chunk i - W, and the
producer asks (`Progress`) how far it may write. So a prompt several times the whole pool is delivered by
a consumer that never holds more than W of its chunks, and the window, once granted, never shrinks.

Capacity is handed out first come, first served: an ALLOC refused for lack of slots joins a queue, and a
later ALLOC is granted only from the slots left once every transfer queued before it has what it waits
for. So a stream of small transfers cannot keep taking the last slots a large window waits for. A queued
transfer whose producer stops asking (it retries every `retry_after_s`) leaves the queue after `stale_s`.

A producer whose ALLOC went unanswered withdraws it (wire.Withdraw) once it reaches us again. The ALLOC may
have come before (its lease, answered to nobody, ends: `SlotPool.withdraw`) or come after, on the old
connection a healed link delivers late: the desk remembers the last `MAX_WITHDRAWN` withdrawals that came
first and refuses their ALLOCs (one evicted from that memory holds its slots for its unanswered rest,
quarantine.py).
"""
from __future__ import annotations

import time
from collections import OrderedDict

from transfer import wire
from transfer.geometry import ChunkGeometry
from transfer.receive_book import DELIVERED, ReceiveBook
from transfer.slot_pool import LeaseInUse, SlotPool


class GrantQueue:
    """Transfers waiting for slots, oldest first: key -> (slots wanted, last asked)."""

    def __init__(self, stale_s: float = 1.0, max_waiting: int = 4096, clock=time.monotonic) -> None:
        self.stale_s = stale_s
        self.max_waiting = max_waiting
        self._clock = clock
        self._waiting: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def reserved_before(self, key: str) -> int:
        """Slots the transfers queued before `key` (all of them, if it is not queued) still wait for."""
        now = self._clock()
        for k in [k for k, (_, seen) in self._waiting.items() if now - seen > self.stale_s]:
            del self._waiting[k]
        ahead = 0
        for k, (want, _) in self._waiting.items():
            if k == key:
                break
            ahead += want
        return ahead

    def wait(self, key: str, want: int) -> None:
        """`key` was refused for lack of slots: it keeps its place in the queue (or joins at the end)."""
        if key not in self._waiting and len(self._waiting) >= self.max_waiting:
            self._waiting.popitem(last=False)
        self._waiting[key] = (want, self._clock())

    def leave(self, key: str) -> None:
        """`key` was granted, or its producer released or gave up on it: it waits no more."""
        self._waiting.pop(key, None)

    def __len__(self) -> int:
        return len(self._waiting)


MAX_WITHDRAWN = 4096


class LeaseDesk:
    def __init__(self, pool: SlotPool, book: ReceiveBook, geometry: ChunkGeometry, region_addr: int,
                 window_slots: int, expect_wait_s: float, incarnation: str) -> None:
        """`window_slots` 0 means the whole pool: only a transfer larger than the pool streams, and one that
        does waits for every slot. Fewer lets small transfers flow beside a streaming one. `incarnation`
        is the consumer's, named in every grant."""
        self.pool, self.book, self.geometry = pool, book, geometry
        self.incarnation = incarnation
        self.region_addr = region_addr
        self.window_slots = min(pool.num_slots, window_slots or pool.num_slots)
        self.expect_wait_s = expect_wait_s
        self.queue = GrantQueue()
        # (producer, transfer, alloc_id) of withdrawals that came before their ALLOC, oldest first
        self._withdrawn: OrderedDict[tuple[str, str, int], None] = OrderedDict()

    def withdraw(self, msg: wire.Withdraw) -> None:
        """End the lease only the withdrawn ALLOC was answered with (its request then follows the load-failure
        policy, as when a lease expires), or refuse that ALLOC when it comes."""
        found = self.pool.withdraw(msg.transfer_id, msg.incarnation, msg.alloc_id)
        if found == "ended":
            self.book.count("allocs_withdrawn")
            self.book.fail(msg.transfer_id, "its producer never heard its ALLOC answered, and withdrew it")
        elif not found:  # not come yet: refuse it when it comes (it could end a newer attempt's lease)
            self._withdrawn[(msg.incarnation, msg.transfer_id, msg.alloc_id)] = None
            if len(self._withdrawn) > MAX_WITHDRAWN:
                self._withdrawn.popitem(last=False)

    def alloc(self, msg: wire.Alloc, write_hold_s: float = 0.0) -> wire.Message:
        """Answer an ALLOC; `write_hold_s`: how long a cut link may hold its producer's writes (quarantine.py)."""
        if (msg.incarnation, msg.transfer_id, msg.alloc_id) in self._withdrawn:
            del self._withdrawn[(msg.incarnation, msg.transfer_id, msg.alloc_id)]
            self.book.count("allocs_refused_withdrawn")
            return wire.Error(code="withdrawn", message=f"transfer {msg.transfer_id}: ALLOC {msg.alloc_id} was "
                              "withdrawn by its producer before it arrived")
        refused = self.book.check_alloc(msg.transfer_id, msg.num_tokens, msg.token_hash)
        if refused == DELIVERED:  # the same prompt pushed again (repeated in its request): ended, not failed
            return wire.Error(code=wire.LEASE_IN_USE, message=f"transfer {msg.transfer_id}: {refused}")
        if refused:
            return wire.Error(code="refused", message=f"transfer {msg.transfer_id}: {refused}")
        held = self.book.held_chunks(msg.transfer_id)
        if held is None and self.book.alloc_waits(msg.transfer_id, self.expect_wait_s):
            return wire.NoCapacity(transfer_id=msg.transfer_id, free_slots=self.pool.stats().free, retry_after_s=0.005)
        sizes = self.geometry.all_chunk_nbytes(msg.num_tokens)
        skip = min(held or 0, len(sizes) - 1)  # the decode computes at least the last prompt token itself
        sizes = sizes[skip:]
        window = min(len(sizes), self.window_slots)
        try:
            lease = self.pool.grant(msg.transfer_id, sizes, msg.ttl_s, msg.incarnation, msg.attempt, skip, window,
                                    keep_free=self.queue.reserved_before(msg.transfer_id), alloc_id=msg.alloc_id,
                                    write_hold_s=write_hold_s)
        except LeaseInUse as e:
            self.book.count("allocs_refused_lease_in_use")
            return wire.Error(code=wire.LEASE_IN_USE, message=str(e))
        if lease is None:
            self.queue.wait(msg.transfer_id, window)
            self.book.sign_of_life(msg.transfer_id)  # queued for slots: its request keeps waiting
            return wire.NoCapacity(transfer_id=msg.transfer_id, free_slots=self.pool.stats().free, retry_after_s=0.05)
        self.queue.leave(msg.transfer_id)
        self.book.granted(msg.transfer_id, lease.epoch, msg.num_tokens, msg.token_hash)
        if lease.windowed:
            self.book.count("transfers_windowed")
        self.book.count("chunks_not_sent_held_by_decode", lease.first_chunk)
        offsets = [self.region_addr + s * self.pool.slot_bytes for s in lease.slots]
        return wire.Grant(transfer_id=msg.transfer_id, epoch=lease.epoch, offsets=offsets, ttl_s=msg.ttl_s,
                          incarnation=self.incarnation, skip_chunks=lease.first_chunk, chunks=len(sizes))

    def progress(self, msg: wire.Progress) -> wire.Message:
        """How far the producer may write now; renews the lease like RENEW (its push is alive)."""
        lease = self.pool.renew(msg.transfer_id, msg.epoch, msg.ttl_s)
        if lease is None:
            return wire.WindowState(ok=False, writable=0)
        return wire.WindowState(ok=True, writable=lease.writable)

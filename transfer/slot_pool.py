"""Consumer-side slot pool: fixed-size slots in one registered region, handed out as leases.

A one-sided NIXL write cannot be refused when it lands, so safety comes from ordering, timing and
quarantine, not from checks on arrival:
- the producer stops writing `write_margin_s` before the lease deadline it was told;
- slots of a lease that ends without all its chunks sit in quarantine before reuse (quarantine.py: until its
  producer's fence, which NIXL sends only after its earlier writes landed, or its word before the deadline that it
  stopped, each plus `quarantine_s`; else `fence_timeout_s`, or as long as its producer's TCP may hold a write if
  longer, past its deadline; at once when its last chunk's
  notice comes), so a late write can only land in a slot nobody holds;
- a notice for a chunk is accepted only if transfer key, epoch and producer incarnation
  match a live lease and its byte count is exactly what that chunk index must hold;
  anything else is dropped and counted;
- a lease the worker is scattering from is *pinned*: it neither expires nor gives its slots
  back until the last pin is gone, whatever ends it meanwhile (a cancel, a new attempt);
- a lease may hold fewer slots than it carries chunks (a *window*): chunk i lands in window slot
  i mod W, and only once chunk i - W has been scattered and its scatter is done (`free_front`);
  a notice for a chunk outside the open window is dropped like any other wrong notice.

Invariant: every slot is in exactly one of free, a live lease, a draining (pinned, ended)
lease, or quarantine; `stats()` adds up to `num_slots`.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from transfer.identity import KEY_SEPARATOR
from transfer.lease import Lease, LeaseInUse, wrong_chunk
from transfer.notice import ChunkNotice
from transfer.quarantine import Quarantine


@dataclass(frozen=True)
class PoolStats:
    total: int
    free: int
    used: int
    quarantined: int
    expired_total: int
    dropped_total: int


class SlotPool:
    def __init__(self, num_slots: int, slot_bytes: int, quarantine_s: float = 2.0, fence_timeout_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_expire: Callable[[str], None] | None = None) -> None:
        """`on_expire(transfer_id)` runs (under the pool's lock: it must not call back into the pool)
        when a lease reaches its deadline: its producer went silent. quarantine.py says how long the slots of an
        ended lease rest."""
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self._clock = clock
        self._on_expire = on_expire
        self._lock = threading.Lock()
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._ended = Quarantine(quarantine_s, fence_timeout_s)  # ended leases whose slots are not back yet
        self._leases: dict[str, Lease] = {}
        self._next_epoch = 1
        self.expired_total = 0
        self.dropped_total = 0

    def grant(self, transfer_id: str, chunk_nbytes: list[int], ttl_s: float, producer: str, attempt: int = 0,
              first_chunk: int = 0, window: int | None = None, keep_free: int = 0, alloc_id: int = 0,
              write_hold_s: float = 0.0) -> Lease | None:
        """Lease `window` slots (default: one per chunk) while leaving `keep_free` slots free for others, or None
        when that is not possible now (caller says NO_CAPACITY). The same producer asking again for the same
        attempt gets its lease back (a lost reply) while nothing arrived in it; once a chunk did, the ask is a
        second push and raises LeaseInUse. A new attempt, another producer, or a push after the old one's fence
        ends the old lease first. `write_hold_s`: how long a cut link may hold its producer's writes (quarantine.py)."""
        if any(n <= 0 or n > self.slot_bytes for n in chunk_nbytes):
            raise ValueError(f"chunk sizes {chunk_nbytes} do not fit {self.slot_bytes}-byte slots")
        with self._lock:
            self._reap_locked()
            old = self._leases.get(transfer_id)
            if old is not None:
                if old.producer == producer and old.attempt == attempt and not old.fenced:
                    if not old.untouched:
                        raise LeaseInUse(old)
                    old.deadline = max(old.deadline, self._clock() + ttl_s)  # the reply tells the producer ttl_s
                    old.alloc_ids.add(alloc_id)
                    return old
                self._end_locked(old)
            want = len(chunk_nbytes) if window is None else max(1, min(window, len(chunk_nbytes)))
            if want + keep_free > len(self._free):
                return None
            slots = [self._free.pop() for _ in range(want)]
            lease = Lease(transfer_id, slots, self._next_epoch, self._clock() + ttl_s, producer,
                          list(chunk_nbytes), attempt, first_chunk, alloc_ids={alloc_id}, write_hold_s=write_hold_s)
            self._next_epoch += 1
            self._leases[transfer_id] = lease
            return lease

    def withdraw(self, transfer_id: str, producer: str, alloc_id: int) -> str:
        """`producer` never heard the answer to its ALLOC `alloc_id`, so it writes nothing under it: a lease no
        other ALLOC was answered with ends ("ended"), its slots resting only quarantine_s, as after a fence.
        "kept": that ALLOC's lease, which another ALLOC got too or chunks arrived in; "": no lease it got."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is None or lease.producer != producer or alloc_id not in lease.alloc_ids:
                return ""
            lease.alloc_ids.discard(alloc_id)
            if lease.alloc_ids or not lease.untouched:
                return "kept"
            lease.fenced = True
            self._end_locked(lease)
            return "ended"

    def renew(self, transfer_id: str, epoch: int, ttl_s: float) -> Lease | None:
        with self._lock:
            self._reap_locked()
            lease = self._leases.get(transfer_id)
            if lease is None or lease.epoch != epoch:
                return None
            lease.deadline = max(lease.deadline, self._clock() + ttl_s)
            return lease

    def live(self, transfer_id: str) -> Lease | None:
        with self._lock:
            self._reap_locked()
            return self._leases.get(transfer_id)

    def accept(self, notice: ChunkNotice) -> str:
        """Record an arrived chunk; '' when accepted, else why it was dropped (and counted). A chunk of an ended
        lease is dropped too, but still counted as landed there: once all did, its slots are free (quarantine.py)."""
        with self._lock:
            self._reap_locked()
            lease = self._leases.get(notice.transfer_id)
            ended = lease is None or lease.epoch != notice.epoch
            if ended:
                lease = self._ended.find(notice.transfer_id, notice.epoch)
            why = wrong_chunk(lease, notice)
            if not why:
                lease.arrived[notice.chunk] = notice
                if not ended:
                    return ""
                why = "its lease has ended"
                self._free.extend(self._ended.landed(lease))
            self.dropped_total += 1
            return why

    def keys_of(self, transfer_id: str) -> list[str]:
        """Live lease names that are `transfer_id` or one of its per-prompt keys (`transfer_id/hash`)."""
        with self._lock:
            return [k for k in self._leases if k == transfer_id or k.startswith(transfer_id + KEY_SEPARATOR)]

    def receiving(self) -> bool:
        """Whether any live lease still waits for chunks (the endpoint then polls every lease_poll_s)."""
        with self._lock:
            return any(not lease.complete for lease in self._leases.values())

    def under_way(self) -> bool:
        """Whether a live lease took chunks and waits for more: its rest comes with its prefill's next forwards."""
        with self._lock:
            return any((lease.arrived or lease.freed) and not lease.complete for lease in self._leases.values())

    def count_drop(self) -> None:
        with self._lock:
            self.dropped_total += 1

    def pin(self, transfer_id: str) -> Lease | None:
        """Hold a complete lease's slots for reading: they stay put until `unpin`. (A windowed lease is
        read as it lands, with `take_front`: its slots no longer hold its first chunks.)"""
        with self._lock:
            self._reap_locked()
            lease = self._leases.get(transfer_id)
            if lease is None or not lease.complete or lease.windowed:
                return None
            lease.pins += 1
            return lease

    def take_front(self, transfer_id: str, epoch: int) -> tuple[Lease | None, list[int]]:
        """Pin a windowed lease and hand its reader the chunks that arrived in order since the last take
        (lease chunk indices); the pin holds until `free_front`. (None, []) when there is no such lease
        with that epoch."""
        with self._lock:
            self._reap_locked()
            lease = self._leases.get(transfer_id)
            if lease is None or not lease.windowed or lease.epoch != epoch:
                return None, []
            start = lease.taken
            while lease.taken in lease.arrived:
                lease.taken += 1
            if lease.taken == start:
                return lease, []
            lease.pins += 1
            return lease, list(range(start, lease.taken))

    def free_front(self, lease: Lease, upto: int) -> None:
        """The scatter of the chunks below `upto` is done: their slots take the next chunks, and the
        pin of the take that handed them out is dropped."""
        with self._lock:
            for c in range(lease.freed, upto):
                lease.arrived.pop(c, None)
            lease.freed = max(lease.freed, upto)
            lease.pins -= 1
            self._free.extend(self._ended.unpinned(lease, self._clock()))

    def unpin(self, lease: Lease, release: bool) -> None:
        """Drop one pin; with `release`, end the lease too (its slots are free once no pin is left)."""
        with self._lock:
            lease.pins -= 1
            if release and self._leases.get(lease.transfer_id) is lease:
                self._end_locked(lease)
            else:
                self._free.extend(self._ended.unpinned(lease, self._clock()))

    def release(self, transfer_id: str, epoch: int | None = None, producer_stopped: bool = False) -> bool:
        """End a lease; idempotent. Slots of an incomplete lease go to quarantine (shorter when its producer
        releases it before its deadline: `producer_stopped`)."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is None or (epoch is not None and lease.epoch != epoch):
                return False
            lease.producer_stopped = producer_stopped and self._clock() <= lease.deadline  # quarantine.py: in time
            self._end_locked(lease)
            return True

    def stopped(self, transfer_id: str, epoch: int) -> bool:
        """The producer of an ended lease (`transfer_id`, `epoch`) says it writes no more: before the lease's
        deadline its slots rest only `quarantine_s` from now. Whether such a lease was found."""
        with self._lock:
            return self._ended.stopped(transfer_id, epoch, self._clock())

    def fence(self, transfer_id: str, epoch: int, producer: str) -> bool:
        """`producer`'s fence for its lease (`transfer_id`, `epoch`) came: once that lease has ended (now or
        later) its slots rest only `quarantine_s`. Whether such a lease was found."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is not None and (lease.epoch, lease.producer) == (epoch, producer):
                lease.fenced = True
                return True
            return self._ended.fenced(transfer_id, epoch, producer, self._clock())

    def resting(self, transfer_id: str, epoch: int) -> Lease | None:
        """That ended lease (`transfer_id`, `epoch`) while its slots are not back yet (draining or in quarantine)."""
        with self._lock:
            return self._ended.find(transfer_id, epoch)

    def release_producer(self, producer: str, restarted: bool = False) -> int:
        """End every lease of a producer incarnation that is gone; `restarted`: a newer generation said hello, so
        none of its leases waits for its fence, only past its deadline (quarantine.py)."""
        with self._lock:
            gone = [lease for lease in self._leases.values() if lease.producer == producer]
            for lease in gone:
                lease.producer_gone = lease.producer_gone or restarted
                self._end_locked(lease)
            if restarted:
                self._ended.producer_gone(producer, self._clock())
            return len(gone)

    def stats(self) -> PoolStats:
        with self._lock:
            self._reap_locked()
            q = self._ended.slots
            return PoolStats(self.num_slots, len(self._free), self.num_slots - len(self._free) - q,
                             q, self.expired_total, self.dropped_total)

    def _end_locked(self, lease: Lease) -> None:
        del self._leases[lease.transfer_id]
        self._free.extend(self._ended.end(lease, self._clock()))

    def _reap_locked(self) -> None:
        now = self._clock()
        for lease in [x for x in self._leases.values() if x.deadline <= now and not x.pins]:
            self.expired_total += 1
            self._end_locked(lease)
            if self._on_expire is not None:
                self._on_expire(lease.transfer_id)
        self._free.extend(self._ended.reap(now))

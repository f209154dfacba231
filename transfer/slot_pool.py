"""Consumer-side slot pool: fixed-size slots in one registered region, handed out as leases.

A one-sided NIXL write cannot be refused when it lands, so safety comes from timing and
quarantine, not from checks on arrival:
- the producer stops writing `write_margin_s` before the lease deadline it was told;
- slots of a lease that ends without all its chunks (expiry, abort) sit in quarantine for
  `quarantine_s` before reuse, so a late write can only land in a slot nobody holds;
- a notice for a chunk is accepted only if transfer id, epoch and producer incarnation
  match a live lease; anything else is dropped and counted.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from transfer.notice import ChunkNotice


@dataclass
class Lease:
    transfer_id: str
    slots: list[int]
    epoch: int
    deadline: float
    producer: str
    arrived: dict[int, ChunkNotice] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.arrived) == len(self.slots)


@dataclass(frozen=True)
class PoolStats:
    total: int
    free: int
    used: int
    quarantined: int
    expired_total: int
    dropped_total: int


class SlotPool:
    def __init__(self, num_slots: int, slot_bytes: int, quarantine_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.quarantine_s = quarantine_s
        self._clock = clock
        self._lock = threading.Lock()
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._quarantine: list[tuple[float, list[int]]] = []
        self._leases: dict[str, Lease] = {}
        self._next_epoch = 1
        self.expired_total = 0
        self.dropped_total = 0

    def grant(self, transfer_id: str, n_chunks: int, ttl_s: float, producer: str) -> Lease | None:
        """Lease `n_chunks` slots, or None when they are not free right now (caller says NO_CAPACITY)."""
        with self._lock:
            self._reap_locked()
            old = self._leases.get(transfer_id)
            if old is not None:
                if old.producer == producer:
                    return old
                self._end_locked(old, complete=False)
            if n_chunks > len(self._free):
                return None
            slots = [self._free.pop() for _ in range(n_chunks)]
            lease = Lease(transfer_id, slots, self._next_epoch, self._clock() + ttl_s, producer)
            self._next_epoch += 1
            self._leases[transfer_id] = lease
            return lease

    def renew(self, transfer_id: str, epoch: int, ttl_s: float) -> Lease | None:
        with self._lock:
            self._reap_locked()
            lease = self._leases.get(transfer_id)
            if lease is None or lease.epoch != epoch:
                return None
            lease.deadline = self._clock() + ttl_s
            return lease

    def live(self, transfer_id: str) -> Lease | None:
        with self._lock:
            self._reap_locked()
            return self._leases.get(transfer_id)

    def accept(self, notice: ChunkNotice) -> bool:
        """Record an arrived chunk if it belongs to a live lease; count and drop it otherwise."""
        with self._lock:
            self._reap_locked()
            lease = self._leases.get(notice.transfer_id)
            ok = (lease is not None and lease.epoch == notice.epoch
                  and lease.producer == notice.incarnation
                  and 0 <= notice.chunk < len(lease.slots))
            if not ok:
                self.dropped_total += 1
                return False
            lease.arrived[notice.chunk] = notice
            return True

    def count_drop(self) -> None:
        with self._lock:
            self.dropped_total += 1

    def release(self, transfer_id: str, epoch: int | None = None) -> bool:
        """End a lease; idempotent. Slots of an incomplete lease go to quarantine."""
        with self._lock:
            lease = self._leases.get(transfer_id)
            if lease is None or (epoch is not None and lease.epoch != epoch):
                return False
            self._end_locked(lease, complete=lease.complete)
            return True

    def release_producer(self, producer: str) -> int:
        """End every lease of a producer incarnation that is gone (restart or death)."""
        with self._lock:
            gone = [lease for lease in self._leases.values() if lease.producer == producer]
            for lease in gone:
                self._end_locked(lease, complete=False)
            return len(gone)

    def reap(self) -> None:
        with self._lock:
            self._reap_locked()

    def stats(self) -> PoolStats:
        with self._lock:
            self._reap_locked()
            q = sum(len(s) for _, s in self._quarantine)
            return PoolStats(self.num_slots, len(self._free), self.num_slots - len(self._free) - q,
                             q, self.expired_total, self.dropped_total)

    def _end_locked(self, lease: Lease, complete: bool) -> None:
        del self._leases[lease.transfer_id]
        if complete:
            self._free.extend(lease.slots)
        else:
            self._quarantine.append((self._clock() + self.quarantine_s, lease.slots))

    def _reap_locked(self) -> None:
        now = self._clock()
        for lease in [x for x in self._leases.values() if x.deadline <= now]:
            self.expired_total += 1
            self._end_locked(lease, complete=False)
        if self._quarantine:
            keep = []
            for until, slots in self._quarantine:
                if until <= now:
                    self._free.extend(slots)
                else:
                    keep.append((until, slots))
            self._quarantine = keep

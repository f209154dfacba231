"""Slots of ended leases that are not back in the pool yet: read by a pinned reader, or resting until no late
write can land in them.

A one-sided write cannot be refused, and one posted before a link was cut lands when the link comes back, however
late (TCP holds it and retransmits; releasing the write's handle does not recall it, and neither does this side
removing the producer's NIXL agent: tests/test_late_write.py). So an ended lease's slots go back only once nothing
its producer wrote there can still be on the way:
- every chunk of the lease arrived: each chunk is written once and its notice comes after its bytes, so no write
  is left; the slots are free at once (a chunk notice that comes after the end still counts, `landed`);
- its producer's fence came (`fenced`, notice.py): NIXL sends it only after every byte that producer posted to
  this consumer before it has landed, so the slots rest only `quarantine_s` from then (a margin);
- its producer said it stopped (a release over the control channel, its own or after the consumer ended the
  lease) before the lease's deadline: the producer was in touch, so what it had posted lands within
  `quarantine_s` from then. A release that comes after the deadline may come from a producer that was cut off and
  proves nothing about its writes;
- its producer restarted (a new generation said hello, `producer_gone`): the old one, forgotten here, learns
  of it at its next renewal at the latest and never writes past the deadline it was told (two generations may
  overlap in a rolling restart): `quarantine_s` past the later of then and that deadline, or for a lease with a
  `write_hold_s` (below) up to `RTO_MAX_S` (120 s) more: the old connection (the old process's, or the kernel's
  once that died) may still hold writes, and with the link back, as the new hello shows, it retransmits them
  within one timeout. That takes the new generation on the old one's kernel: one from another (its hello's
  `boot_id`) is not taken for a restart (producer_registry.py), and the old leases keep the rest below;
- otherwise (expired, or ended by the consumer, with no word from its producer in time): until its fence, or
  past its deadline by `fence_timeout_s` or, if longer, by the lease's `write_hold_s`: how long its producer's TCP
  retransmits a write a cut link holds before dropping it (write_hold.py; 0 when this consumer listens on loopback
  only).
A lease a reader still pins (`draining`) keeps its slots whatever ended it; they take one of the ways above at
the last unpin.
"""
from __future__ import annotations

from typing import Callable, Protocol

from transfer.write_hold import RTO_MAX_S


class EndedLease(Protocol):
    transfer_id: str
    epoch: int
    deadline: float
    slots: list[int]
    pins: int
    producer: str
    producer_stopped: bool
    fenced: bool
    producer_gone: bool
    write_hold_s: float

    @property
    def complete(self) -> bool: ...


class Quarantine:
    """Not thread-safe: the slot pool calls it under its own lock. Methods that give slots back return them."""

    def __init__(self, quarantine_s: float, fence_timeout_s: float) -> None:
        self.quarantine_s = quarantine_s
        self.fence_timeout_s = max(fence_timeout_s, quarantine_s)
        self._draining: list[EndedLease] = []  # ended while pinned: slots return at the last unpin
        self._resting: list[tuple[float, EndedLease]] = []  # (free from, lease)

    def end(self, lease: EndedLease, now: float) -> list[int]:
        """`lease` ended (by either side): its slots if they are free now, else [] (they drain or rest)."""
        if lease.pins:
            self._draining.append(lease)  # a reader holds these slots: they are neither free nor reusable
            return []
        if lease.complete:
            return lease.slots
        self._resting.append((self._until(lease, now), lease))
        return []

    def _until(self, lease: EndedLease, now: float) -> float:
        """When an ended lease's slots come back, by what its producer said (or did not) by `now`."""
        if lease.producer_stopped or lease.fenced:
            return now + self.quarantine_s
        if lease.producer_gone:
            return max(now, lease.deadline) + max(self.quarantine_s, min(lease.write_hold_s,
                                                                         RTO_MAX_S + self.quarantine_s))
        return max(now, lease.deadline) + max(self.fence_timeout_s, lease.write_hold_s)

    def unpinned(self, lease: EndedLease, now: float) -> list[int]:
        """A pin of `lease` was dropped: an ended lease whose last pin is gone ends for good now."""
        if lease.pins or lease not in self._draining:
            return []
        self._draining.remove(lease)
        return self.end(lease, now)

    def stopped(self, transfer_id: str, epoch: int, now: float) -> bool:
        """Its producer says it writes no more to this ended lease: before the lease's deadline its slots rest
        only `quarantine_s` from now (or from the last unpin); after it, nothing changes. Whether such a lease
        was found."""
        return self._told(lambda x: (x.transfer_id, x.epoch) == (transfer_id, epoch), now, "producer_stopped")

    def fenced(self, transfer_id: str, epoch: int, producer: str, now: float) -> bool:
        """The fence of `producer` for this ended lease came: its slots rest only `quarantine_s` from now (or
        from the last unpin). Whether such a lease was found."""
        return self._told(lambda x: (x.transfer_id, x.epoch, x.producer) == (transfer_id, epoch, producer), now,
                          "fenced")

    def producer_gone(self, producer: str, now: float) -> None:
        """That producer incarnation restarted: its leases rest past the later of now and their deadline as the
        module says for a restart, not waiting for its fence."""
        self._told(lambda x: x.producer == producer, now, "producer_gone")

    def _told(self, match: Callable[[EndedLease], bool], now: float, fact: str) -> bool:
        """Record `fact` on the matching ended leases (a stop only before the deadline) and bring their slots'
        return forward to what it allows."""
        found = False
        for lease in [x for x in self._draining if match(x)] + [x for _, x in self._resting if match(x)]:
            found = True
            if fact != "producer_stopped" or now <= lease.deadline:
                setattr(lease, fact, True)
        self._resting = [(min(until, self._until(x, now)) if match(x) else until, x) for until, x in self._resting]
        return found

    def find(self, transfer_id: str, epoch: int) -> EndedLease | None:
        """That ended lease, while its slots are not back (its producer may still say it stopped, or notice
        chunks that landed)."""
        return next((x for x in self._draining if (x.transfer_id, x.epoch) == (transfer_id, epoch)), None) or \
            next((x for _, x in self._resting if (x.transfer_id, x.epoch) == (transfer_id, epoch)), None)

    def landed(self, lease: EndedLease) -> list[int]:
        """A chunk of ended `lease` arrived after its end: once all did, nothing is left to write there."""
        if not lease.complete or not any(x is lease for _, x in self._resting):
            return []
        self._resting = [(until, x) for until, x in self._resting if x is not lease]
        return lease.slots

    def reap(self, now: float) -> list[int]:
        """The slots whose rest is over (removed from here)."""
        done = [lease for until, lease in self._resting if until <= now]
        if done:
            self._resting = [(until, lease) for until, lease in self._resting if until > now]
        return [slot for lease in done for slot in lease.slots]

    @property
    def slots(self) -> int:
        """Slots resting (not those a reader pins: they count as used)."""
        return sum(len(lease.slots) for _, lease in self._resting)

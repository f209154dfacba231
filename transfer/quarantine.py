"""Slots of ended leases that are not back in the pool yet: read by a pinned reader, or resting until no late
write can land in them.

A one-sided write cannot be refused, so an ended lease's slots go back only once its producer cannot be writing
any more:
- every chunk of the lease arrived: each chunk is written once and its notice comes after its bytes, so no write
  is left; the slots are free at once (a chunk notice that comes after the end still counts, `landed`);
- ended by the consumer (a cancel, a failure, an expiry, a new attempt, its producer forgotten): its producer
  learns of it at its next call at the latest, and never writes past the deadline it was told, so the slots
  rest `quarantine_s` past the later of the end and that deadline;
- ended by its producer (a release), or once that producer says it stopped (`stopped`, a release that came
  after the consumer ended the lease): it posts nothing after that, so `quarantine_s` from then covers the
  writes it had posted before.
A lease a reader still pins (`draining`) keeps its slots whatever ended it; they take one of the ways above at
the last unpin.
"""
from __future__ import annotations

from typing import Protocol


class EndedLease(Protocol):
    transfer_id: str
    epoch: int
    deadline: float
    slots: list[int]
    pins: int
    producer_stopped: bool

    @property
    def complete(self) -> bool: ...


class Quarantine:
    """Not thread-safe: the slot pool calls it under its own lock. Methods that give slots back return them."""

    def __init__(self, quarantine_s: float) -> None:
        self.quarantine_s = quarantine_s
        self._draining: list[EndedLease] = []  # ended while pinned: slots return at the last unpin
        self._resting: list[tuple[float, EndedLease]] = []  # (free from, lease)

    def end(self, lease: EndedLease, now: float) -> list[int]:
        """`lease` ended (by either side): its slots if they are free now, else [] (they drain or rest)."""
        if lease.pins:
            self._draining.append(lease)  # a reader holds these slots: they are neither free nor reusable
            return []
        if lease.complete:
            return lease.slots
        start = now if lease.producer_stopped else max(now, lease.deadline)
        self._resting.append((start + self.quarantine_s, lease))
        return []

    def unpinned(self, lease: EndedLease, now: float) -> list[int]:
        """A pin of `lease` was dropped: an ended lease whose last pin is gone ends for good now."""
        if lease.pins or lease not in self._draining:
            return []
        self._draining.remove(lease)
        return self.end(lease, now)

    def stopped(self, transfer_id: str, epoch: int, now: float) -> bool:
        """Its producer writes no more to this ended lease: its slots rest only `quarantine_s` from now (or from
        the last unpin). Whether such a lease was found."""
        found = False
        for lease in self._draining:
            if (lease.transfer_id, lease.epoch) == (transfer_id, epoch):
                lease.producer_stopped = found = True
        for i, (until, lease) in enumerate(self._resting):
            if (lease.transfer_id, lease.epoch) == (transfer_id, epoch):
                lease.producer_stopped = found = True
                self._resting[i] = (min(until, now + self.quarantine_s), lease)
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

"""Slots of leases that ended before all their chunks arrived, resting until no late write can land in them.

A one-sided write cannot be refused, so an ended lease's slots go back to the pool only once its producer
cannot be writing any more:
- ended by the consumer (a cancel, a failure, an expiry, a new attempt): its producer learns of it at its next
  call at the latest, and never writes past the deadline it was told, so the slots rest `quarantine_s` past
  the later of the end and that deadline;
- ended by its producer (a release), or once that producer says it stopped (`stopped`, a release that came
  after the consumer ended the lease): it posts nothing after that, so `quarantine_s` from then covers the
  writes it had posted before.
"""
from __future__ import annotations

from typing import Protocol


class EndedLease(Protocol):
    transfer_id: str
    epoch: int
    deadline: float
    slots: list[int]


class Quarantine:
    """Not thread-safe: the slot pool calls it under its own lock."""

    def __init__(self, quarantine_s: float) -> None:
        self.quarantine_s = quarantine_s
        self._resting: list[tuple[float, EndedLease]] = []  # (free from, lease)

    def add(self, lease: EndedLease, now: float, producer_stopped: bool) -> None:
        start = now if producer_stopped else max(now, lease.deadline)
        self._resting.append((start + self.quarantine_s, lease))

    def stopped(self, transfer_id: str, epoch: int, now: float) -> bool:
        """Its producer writes no more to this lease: its slots rest only `quarantine_s` from now."""
        found = False
        for i, (until, lease) in enumerate(self._resting):
            if lease.transfer_id == transfer_id and lease.epoch == epoch:
                self._resting[i] = (min(until, now + self.quarantine_s), lease)
                found = True
        return found

    def resting(self, transfer_id: str) -> EndedLease | None:
        """The last ended lease of this transfer still resting here (whose producer may say it stopped)."""
        return next((lease for _, lease in reversed(self._resting) if lease.transfer_id == transfer_id), None)

    def reap(self, now: float) -> list[int]:
        """The slots whose rest is over (removed from here)."""
        done = [lease for until, lease in self._resting if until <= now]
        if done:
            self._resting = [(until, lease) for until, lease in self._resting if until > now]
        return [slot for lease in done for slot in lease.slots]

    @property
    def slots(self) -> int:
        return sum(len(lease.slots) for _, lease in self._resting)

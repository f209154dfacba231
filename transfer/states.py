"""The request state machine, in one place: logs, metrics and traces use these names.

producer: NEW -> ALLOCATING -> SENDING -> SENT | FAILED | ABORTED
consumer: EXPECTED -> RECEIVING -> RECEIVED -> SCATTERED | EXPIRED | FAILED | ABORTED

A terminal state is final: later transitions are ignored (and return False), so whoever frees a
transfer's resources on the transition that ended it does so exactly once.
"""
from __future__ import annotations

import logging
import time
from enum import Enum

from prometheus_client import Counter, Histogram

log = logging.getLogger("kvbridge.state")

TRANSITIONS_TOTAL = Counter("kvbridge_transfer_transitions_total",
                            "Transfers entering each state", ["role", "state"])
DURATION = Histogram("kvbridge_transfer_seconds", "From a transfer's first state to its final one, by final state",
                     ["role", "state"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
PUSHED_BYTES = Counter("kvbridge_transfer_pushed_bytes_total", "KV bytes a producer posted to consumers' slots")


class State(str, Enum):
    NEW = "NEW"
    ALLOCATING = "ALLOCATING"
    SENDING = "SENDING"
    SENT = "SENT"
    EXPECTED = "EXPECTED"
    RECEIVING = "RECEIVING"
    RECEIVED = "RECEIVED"
    SCATTERED = "SCATTERED"
    EXPIRED = "EXPIRED"
    FAILED = "FAILED"
    ABORTED = "ABORTED"


S = State
_NEXT = {
    S.NEW: {S.ALLOCATING, S.FAILED, S.ABORTED},
    S.ALLOCATING: {S.SENDING, S.FAILED, S.ABORTED},
    S.SENDING: {S.SENT, S.FAILED, S.ABORTED},
    S.EXPECTED: {S.RECEIVING, S.RECEIVED, S.EXPIRED, S.FAILED, S.ABORTED},
    S.RECEIVING: {S.RECEIVED, S.EXPIRED, S.FAILED, S.ABORTED},
    S.RECEIVED: {S.SCATTERED, S.EXPIRED, S.FAILED, S.ABORTED},
}
TERMINAL = {S.SENT, S.SCATTERED, S.EXPIRED, S.FAILED, S.ABORTED}


class Transfer:
    """One transfer's lifecycle on one side, with a timestamp per state for traces."""

    def __init__(self, transfer_id: str, role: str) -> None:
        self.transfer_id = transfer_id
        self.role = role
        self.state = S.NEW if role == "producer" else S.EXPECTED
        self.reason = ""
        self.times: dict[str, float] = {self.state.value: time.monotonic()}
        TRANSITIONS_TOTAL.labels(role, self.state.value).inc()

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def to(self, state: State, reason: str = "") -> bool:
        """Move to `state`; False (and nothing happens) if already terminal or not allowed."""
        if self.done or state not in _NEXT.get(self.state, ()):
            if not self.done:
                log.error("%s %s: illegal transition %s -> %s", self.role, self.transfer_id,
                          self.state.value, state.value)
            return False
        self.state, self.reason = state, reason
        self.times[state.value] = time.monotonic()
        TRANSITIONS_TOTAL.labels(self.role, state.value).inc()
        if self.done:
            DURATION.labels(self.role, state.value).observe(self.times[state.value] - min(self.times.values()))
        level = logging.WARNING if state in (S.FAILED, S.EXPIRED) else \
            logging.INFO if self.done else logging.DEBUG
        log.log(level, "%s %s -> %s%s %s", self.role, self.transfer_id, state.value,
                f" ({reason})" if reason else "", self.trace()["ms"] if self.done else "")
        return True

    def trace(self) -> dict:
        t0 = min(self.times.values())
        return {"transfer_id": self.transfer_id, "role": self.role, "state": self.state.value,
                "reason": self.reason, "ms": {k: round((v - t0) * 1000, 3) for k, v in self.times.items()}}

"""ALLOCs this producer sent to one consumer and never heard answered, until each is withdrawn.

An ALLOC whose call timed out may still arrive: a cut link holds it and delivers it when it heals, on the
old connection, however late. The consumer then leases slots that nobody will write or release, and the lease
has no fence to come either (we never learnt its epoch), so its slots would rest for an unanswered lease's rest
(the consumer's `fence_timeout_s`, or longer: transfer/quarantine.py). So the link keeps each unanswered ALLOC here and, while the consumer's connection is not
known lost, tries every `RETRY_S` to send a `wire.Withdraw` naming it: the consumer ends the lease it got
(its slots rest quarantine_s), or refuses it when it comes (transfer/lease_desk.py). A withdrawal not
delivered within `GIVE_UP_S` is dropped; its ALLOC, if it ever arrives, holds slots as before this module.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger("kvbridge.producer")
GIVE_UP_S = 600.0
RETRY_S = 2.0


class Unreachable(Exception):
    """What `send` raises while the consumer cannot be reached (the withdrawal is retried later)."""


class UnansweredAllocs:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._pending: dict[int, tuple[str, float]] = {}  # alloc_id -> (transfer key, since)
        self._next_try = 0.0
        self._busy = False
        self._lock = threading.Lock()  # added on the link's thread, claimed from the push thread

    def add(self, transfer_id: str, alloc_id: int) -> None:
        with self._lock:
            self._pending[alloc_id] = (transfer_id, self._clock())

    def __len__(self) -> int:
        return len(self._pending)

    def claim(self) -> bool:
        """Whether a pass of `withdraw_all` is due now (none under way, none failed within RETRY_S); the caller
        that gets True runs one."""
        with self._lock:
            if not self._pending or self._busy or self._clock() < self._next_try:
                return False
            self._busy = True
            return True

    def unclaim(self) -> None:
        """A claimed pass that will not run (its call was cancelled or never queued) or has ended."""
        with self._lock:
            self._busy = False

    def withdraw_all(self, send: Callable[[str, int], None]) -> None:
        """`send(transfer_id, alloc_id)` each pending withdrawal, oldest first, until one finds the consumer
        unreachable (Unreachable): the rest wait for the next pass, RETRY_S on."""
        try:
            for alloc_id, (transfer_id, since) in sorted(self._pending.items(), key=lambda kv: kv[1][1]):
                if self._clock() - since > GIVE_UP_S:
                    log.warning("withdrawal of ALLOC %d (%s) undelivered for %.0f s: dropped", alloc_id,
                                transfer_id, GIVE_UP_S)
                else:
                    try:
                        send(transfer_id, alloc_id)
                        log.info("withdrew unanswered ALLOC %d of %s", alloc_id, transfer_id)
                    except Unreachable:
                        self._next_try = self._clock() + RETRY_S
                        return
                    except Exception as e:  # a refusal another try would get again (ConsumerLink.withdraw)
                        log.warning("withdrawal of ALLOC %d (%s) refused: %s; dropped", alloc_id, transfer_id, e)
                with self._lock:
                    del self._pending[alloc_id]
        finally:
            self.unclaim()

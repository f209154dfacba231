"""The producer's record of one transfer attempt it is pushing (see producer.py)."""
from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass, field

from transfer import wire
from transfer.device_fence import Fence
from transfer.identity import TransferSpec
from transfer.states import State, Transfer


@dataclass
class PushJob:
    """One transfer attempt on its way: chunks staged (gather queued, not yet written), in flight (written,
    not yet completed), the lease that names their destination, and when to renew or retry."""

    t: Transfer
    spec: TransferSpec
    consumer: str
    n_chunks: int
    staged: dict[int, tuple[int, int, Fence]] = field(default_factory=dict)  # chunk -> (slot, nbytes, gather's fence)
    inflight: dict[int, tuple[object, int]] = field(default_factory=dict)  # chunk -> (handle, slot)
    kv_ready_at: dict[int, float] = field(default_factory=dict)  # chunk -> wall clock when stage() was called
    sent: int = 0
    grant: wire.Grant | None = None
    deadline: float = 0.0
    next_renew: float = 0.0
    retry_at: float = 0.0
    abort: bool = False
    peer_down: bool = False  # the consumer did not answer: nothing more to tell it
    call: Future | None = None  # the control call under way on the consumer's link thread
    call_of: tuple[str, float] = ("", 0.0)  # that call's kind (alloc | renew | progress | release) and when it was asked
    released: bool = False  # its lease's release was asked for
    writable: int = 0  # lease chunks below this may be written (a windowed grant's last WindowState)
    window_ask_at: float = 0.0

    def due_in(self, now: float) -> float:
        """Seconds until the push thread must look at this job again unprompted (inf: only an answer, a
        staged chunk or an abort, which wake it, can move it on)."""
        sending = self.t.state == State.SENDING
        if self.inflight or (sending and any(self.may_write(c) for c in self.staged)):
            return 0.0002  # NIXL writes progress only while polled (and a gather's fence is polled too)
        if self.call is not None:
            return 0.0 if self.call.done() else math.inf
        if sending and self.staged:  # every staged chunk waits beyond a closed window: ask again later
            return max(0.0, self.window_ask_at - now)
        if self.t.state in (State.NEW, State.ALLOCATING):
            return self.retry_at - now
        return self.next_renew - now if self.t.state == State.SENDING else math.inf

    def may_write(self, chunk: int) -> bool:
        """Whether prompt chunk `chunk` may be written now: held by the consumer (not sent at all) or
        inside the lease's open window (the whole lease unless the grant is windowed)."""
        skip = self.grant.skip_chunks
        return chunk < skip or chunk - skip < max(self.writable, len(self.grant.offsets))

"""The producer's record of one transfer attempt it is pushing (see producer.py)."""
from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass, field

from transfer import wire
from transfer.identity import TransferSpec
from transfer.staged_chunk import StagedChunk
from transfer.states import State, Transfer


@dataclass
class PushJob:
    """One transfer attempt on its way: chunks staged (gathered in ranges, written, until their last write
    completed: staged_chunk.py), the lease that names their destination, and when to renew or retry."""

    t: Transfer
    spec: TransferSpec
    consumer: str
    n_chunks: int
    staged: dict[int, StagedChunk] = field(default_factory=dict)  # chunk -> its slot, ranges and writes
    sent: int = 0
    grant: wire.Grant | None = None
    deadline: float = 0.0
    next_renew: float = 0.0
    retry_at: float = 0.0
    abort: bool = False
    peer_down: bool = False  # the consumer did not answer: no more control calls to it (a fence still goes)
    call: Future | None = None  # the control call under way on the consumer's link thread
    call_of: tuple[str, float] = ("", 0.0)  # that call's kind (alloc | renew | progress | release) and when it was asked
    released: bool = False  # its lease's release was asked for
    fenced: bool = False  # its lease's fence was sent (chunk_writes.py)
    abandoned: bool = False  # writes of it were given up on their way (`drop`): its release claims no stop
    writable: int = 0  # lease chunks below this may be written (a windowed grant's last WindowState)
    window_ask_at: float = 0.0

    def due_in(self, now: float) -> float:
        """Seconds until the push thread must look at this job again unprompted (inf: only an answer, a
        staged chunk or an abort, which wake it, can move it on)."""
        sending = self.t.state == State.SENDING
        if self.writing() or (sending and any(sc.parts and self.may_write(c) for c, sc in self.staged.items())):
            return 0.0002  # NIXL writes progress only while polled (and a gather's fence is polled too)
        if self.call is not None:
            return 0.0 if self.call.done() else math.inf
        if sending and any(sc.parts for sc in self.staged.values()):  # they wait beyond a closed window: ask later
            return max(0.0, self.window_ask_at - now)
        if self.t.state in (State.NEW, State.ALLOCATING):
            return self.retry_at - now
        return self.next_renew - now if self.t.state == State.SENDING else math.inf

    def writing(self) -> bool:
        """Whether a write of this transfer is in flight (read on the push thread while the engine thread may
        add chunks: `list` copies the dict in one step)."""
        return any(sc.writing for sc in list(self.staged.values()))

    def may_write(self, chunk: int) -> bool:
        """Whether prompt chunk `chunk` may be written now: held by the consumer (not sent at all) or
        inside the lease's open window (the whole lease unless the grant is windowed)."""
        skip = self.grant.skip_chunks
        return chunk < skip or chunk - skip < max(self.writable, len(self.grant.offsets))

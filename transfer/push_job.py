"""The producer's record of one transfer attempt it is pushing (see producer.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from transfer import wire
from transfer.device_fence import Fence
from transfer.identity import TransferSpec
from transfer.states import Transfer


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

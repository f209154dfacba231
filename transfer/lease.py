"""A lease: the slots one transfer attempt of one producer may write, what has arrived in them, and who reads them.

The slot pool (slot_pool.py) hands leases out and takes their slots back; this module holds the lease itself and
the check of a chunk notice against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transfer.notice import ChunkNotice


@dataclass
class Lease:
    transfer_id: str
    slots: list[int]  # the window: lease chunk i lands in slots[i % len(slots)]
    epoch: int
    deadline: float
    producer: str
    chunk_nbytes: list[int]  # every chunk the lease carries (more than its slots when windowed)
    attempt: int = 0
    first_chunk: int = 0  # lease chunk i is prompt chunk first_chunk + i (the consumer holds the ones before)
    arrived: dict[int, ChunkNotice] = field(default_factory=dict)  # arrived and not yet freed
    pins: int = 0
    taken: int = 0  # leading chunks handed to the reader of a windowed lease
    freed: int = 0  # leading chunks scattered and done with: their slots take chunk i + W
    producer_stopped: bool = False  # its producer said it writes no more, before the deadline (quarantine.py)
    fenced: bool = False  # its producer's fence came: nothing it wrote here is still on the way (quarantine.py)
    producer_gone: bool = False  # its producer restarted: it writes nothing past the deadline (quarantine.py)
    alloc_ids: set[int] = field(default_factory=set)  # the ALLOCs answered with it (wire.Withdraw names one)
    write_hold_s: float = 0.0  # how long past the deadline its producer's TCP may still land a write (write_hold.py)

    @property
    def complete(self) -> bool:
        return self.freed + len(self.arrived) == len(self.chunk_nbytes)

    @property
    def windowed(self) -> bool:
        return len(self.slots) < len(self.chunk_nbytes)

    @property
    def writable(self) -> int:
        """Chunks below this index may be written now (the open window)."""
        return min(len(self.chunk_nbytes), self.freed + len(self.slots))

    @property
    def untouched(self) -> bool:
        """Nothing arrived, was read or was freed: handing this lease out again cannot race a reader."""
        return not self.arrived and not self.freed and not self.taken and not self.pins

    def slot_of(self, chunk: int) -> int:
        return self.slots[chunk % len(self.slots)]


class LeaseInUse(RuntimeError):
    """An ALLOC asked again for a lease that already took chunks (a second push of the same key and attempt,
    not a lost reply): its slots may be read or freed while the second push writes, so it is refused."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(f"transfer {lease.transfer_id} attempt {lease.attempt} already holds lease epoch "
                         f"{lease.epoch} with {lease.freed + len(lease.arrived)} of {len(lease.chunk_nbytes)} "
                         f"chunks arrived{' and being read' if lease.pins else ''}: a second push of it is refused")
        self.transfer_id = lease.transfer_id


def wrong_chunk(lease: Lease | None, notice: ChunkNotice) -> str:
    """Why `notice` cannot be a chunk of `lease` ('' when it can)."""
    if lease is None or lease.producer != notice.incarnation:
        return "no lease with that epoch and producer"
    if not 0 <= notice.chunk < len(lease.chunk_nbytes):
        return f"chunk index {notice.chunk} outside 0..{len(lease.chunk_nbytes) - 1}"
    if not lease.freed <= notice.chunk < lease.writable:
        return f"chunk {notice.chunk} outside the open window {lease.freed}..{lease.writable - 1}"
    if notice.nbytes != lease.chunk_nbytes[notice.chunk]:
        return f"chunk {notice.chunk} has {notice.nbytes} bytes, it must hold {lease.chunk_nbytes[notice.chunk]}"
    return ""

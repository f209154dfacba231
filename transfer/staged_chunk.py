"""One chunk in a producer staging slot: gathered in parts, written in parts, announced once whole.

A chunk the prefill's forward completes is gathered one group of layers at a time while later layers
compute (pd/push_side.py), so it reaches the push thread as byte ranges of its slot, each with the fence
recorded after its gather. The push thread writes each range once its fence is done. The chunk's notice
rides on its last range, and that write is posted only after every other range's write completed: the
consumer treats a notice as "the whole chunk is in the slot" (transfer/consumer_endpoint.py), so the notice
must never overtake the chunk's bytes. A chunk staged whole is the one-range case.

Invariants:
- Until `whole`, the engine thread may still write into the slot: the push thread never releases or reuses
  it. When the transfer ended first, the engine thread's next `Producer.stage_part` gives the slot up: freed at
  once if the job is gone, else marked whole for the push thread to free with the job.
- A whole chunk's slot is free again only when no write from it is in flight.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transfer.device_fence import Fence

HELD = -1  # `Producer.open`'s answer for a chunk the consumer already holds: nothing to gather


@dataclass
class StagedChunk:
    slot: int
    parts: list[tuple[int, int, Fence]] = field(default_factory=list)  # (start, end, fence): gathered, not written
    whole: bool = False  # the engine thread staged the last range
    nbytes: int = 0  # the whole chunk's size, set with its last range
    kv_ready_at: float = 0.0  # wall clock when its last range was staged: the consumer's exposed time starts
    writing: list[object] = field(default_factory=list)  # NIXL handles of ranges written, not yet completed
    announced: bool = False  # the range that carries the notice is written

    def take(self) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
        """What to write now, taken off `parts`: the ranges whose gather completed, and, only when nothing else
        of the chunk is left to write or still in flight, its last range, to go with the notice (then
        `announced`). The caller records each write it posts in `writing`."""
        if self.announced:
            return [], None
        out, keep = [], []
        for i, (start, end, fence) in enumerate(self.parts):
            if fence.done() and not (self.whole and i == len(self.parts) - 1):
                out.append((start, end))
            else:
                keep.append((start, end, fence))
        self.parts = keep
        if out or not self.whole or self.writing or len(keep) != 1 or not keep[0][2].done():
            return out, None
        start, end, _ = self.parts.pop()
        self.announced = True
        return out, (start, end)

"""The decode side of a windowed transfer: scatter chunks into the request's blocks as they land.

A transfer larger than the consumer's window (transfer/lease_desk.py) cannot wait until all of it has
arrived: its producer writes chunk i only after chunk i - W has been scattered. The decode request's
blocks are all allocated when it is scheduled, so each step the worker verifies the chunks that landed
(in order), scatters them into their blocks and hands their slots back (once the scatter's fence is done).
Only verified bytes are scattered: the token hash was checked against the request before the first
chunk, each chunk's checksum before its own scatter. A transfer that fails midway is reported as a failed
receive: vLLM then recomputes the whole prompt (num_computed_tokens back to 0, blocks not cached), so the
chunks scattered so far are never served.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pd.paged_kv import PagedKV
from pd.scheduler_side import LoadTask
from transfer.consumer_endpoint import ConsumerEndpoint
from transfer.device_fence import COMPLETED, Fence
from transfer.notice import ChunkNotice


@dataclass(frozen=True)
class StreamStep:
    windowed: bool  # False: the lease is a whole one (or none yet): the caller claims it once complete
    done: bool = False  # every chunk is scattered
    failed: str = ""  # why the transfer must not be used
    notices: tuple[ChunkNotice, ...] = ()  # of the chunks this step scattered: their bytes and kv_ready_at


def scatter_landed(endpoint: ConsumerEndpoint, kv: PagedKV, task: LoadTask, reader: str,
                   chunk_blocks: Callable[[int, int], tuple[int, int]], blocks_per_chunk: int,
                   record_fence: Callable[[], Fence]) -> StreamStep:
    """Scatter the chunks of `task`'s windowed transfer that landed since the last call (`reader` names the
    request; `chunk_blocks(num_tokens, chunk)` gives a chunk's block range)."""
    key = task.spec.key
    lease, chunks, why = endpoint.book.take_window(key, reader)
    if why:
        return StreamStep(True, failed=why)
    if lease is None:
        return StreamStep(False)
    if not chunks:
        return StreamStep(True)
    bad = endpoint.verify(lease, chunks)
    if bad or lease.first_chunk * blocks_per_chunk > task.skip_blocks:
        endpoint.book.window_done(key, lease, chunks[-1] + 1, COMPLETED)  # nothing read: the slots go at once
        return StreamStep(True, failed=f"checksum mismatch in chunks {bad}" if bad else
                          f"the transfer starts at chunk {lease.first_chunk}, this request holds only "
                          f"{task.skip_blocks} blocks itself")
    for c, view in zip(chunks, endpoint.chunk_views(lease, chunks)):
        lo, hi = chunk_blocks(task.spec.num_tokens, lease.first_chunk + c)
        ids = task.block_ids[lo:hi]
        kv.scatter(ids, view, max(0, min(task.skip_blocks - lo, len(ids))))
    notices = tuple(lease.arrived[c] for c in chunks)  # read before window_done frees them
    endpoint.book.window_done(key, lease, chunks[-1] + 1, record_fence())
    return StreamStep(True, done=lease.taken == len(lease.chunk_nbytes), notices=notices)

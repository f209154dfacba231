"""The decode side of a transfer: its verified chunks scattered into the request's blocks.

A whole lease is scattered once every chunk arrived (`scatter_whole`). A transfer larger than the
consumer's window (transfer/lease_desk.py) cannot wait until all of it has arrived: its producer writes
chunk i only after chunk i - W has been scattered, so each step the worker verifies the chunks that landed
(in order), scatters them into their blocks and hands their slots back once the scatter's fence is done
(`scatter_landed`). The decode request's blocks are all allocated when it is scheduled.

Only verified bytes are scattered: the token hash was checked against the request before the first
chunk, each chunk's checksum before its own scatter. A transfer that fails midway is reported as a failed
receive: vLLM then recomputes the whole prompt (num_computed_tokens back to 0, blocks not cached), so the
chunks scattered so far are never served.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pd.paged_kv import PagedKV
from pd.step_metadata import LoadTask
from transfer.consumer_endpoint import ConsumerEndpoint
from transfer.device_fence import COMPLETED, Fence
from transfer.notice import ChunkNotice
from transfer.slot_pool import Lease

ChunkBlocks = Callable[[int, int], tuple[int, int]]  # (num_tokens, chunk) -> the chunk's block range


@dataclass(frozen=True)
class StreamStep:
    windowed: bool  # False: the lease is a whole one (or none yet): the caller claims it once complete
    done: bool = False  # every chunk is scattered
    failed: str = ""  # why the transfer must not be used
    notices: tuple[ChunkNotice, ...] = ()  # of the chunks this step scattered: their bytes and kv_ready_at


def scatter_whole(endpoint: ConsumerEndpoint, kv: PagedKV, task: LoadTask, chunk_blocks: ChunkBlocks,
                  blocks_per_chunk: int) -> tuple[Lease | None, str]:
    """Claim `task`'s complete lease and scatter every chunk; (lease, '') or (lease or None, why not)."""
    lease, why = endpoint.book.claim(task.spec.key)
    if lease is None:
        return None, why
    why = _unusable(endpoint, lease, None, task, blocks_per_chunk)
    if not why:
        _scatter(endpoint, kv, task, lease, range(len(lease.chunk_nbytes)), chunk_blocks)
    return lease, why


def scatter_landed(endpoint: ConsumerEndpoint, kv: PagedKV, task: LoadTask, reader: str,
                   chunk_blocks: ChunkBlocks, blocks_per_chunk: int,
                   record_fence: Callable[[], Fence]) -> StreamStep:
    """Scatter the chunks of `task`'s windowed transfer that landed since the last call (`reader` names the
    request)."""
    key = task.spec.key
    lease, chunks, why = endpoint.book.take_window(key, reader)
    if why:
        return StreamStep(True, failed=why)
    if lease is None:
        return StreamStep(False)
    if not chunks:
        return StreamStep(True)
    why = _unusable(endpoint, lease, chunks, task, blocks_per_chunk)
    if why:
        endpoint.book.window_done(key, lease, chunks[-1] + 1, COMPLETED)  # nothing read: the slots go at once
        return StreamStep(True, failed=why)
    _scatter(endpoint, kv, task, lease, chunks, chunk_blocks)
    notices = tuple(lease.arrived[c] for c in chunks)  # read before window_done frees them
    endpoint.book.window_done(key, lease, chunks[-1] + 1, record_fence())
    return StreamStep(True, done=lease.taken == len(lease.chunk_nbytes), notices=notices)


def _unusable(endpoint: ConsumerEndpoint, lease: Lease, chunks: list[int] | None, task: LoadTask,
              blocks_per_chunk: int) -> str:
    bad = endpoint.verify(lease, chunks)
    if bad:
        return f"checksum mismatch in chunks {bad}"
    if lease.first_chunk * blocks_per_chunk > task.skip_blocks:
        return (f"the transfer starts at chunk {lease.first_chunk}, this request holds only {task.skip_blocks} "
                "blocks itself")
    return ""


def _scatter(endpoint: ConsumerEndpoint, kv: PagedKV, task: LoadTask, lease: Lease, chunks, chunk_blocks: ChunkBlocks
             ) -> None:
    """Lease chunks `chunks` into their blocks (blocks the request already holds itself are skipped)."""
    for c, view in zip(chunks, endpoint.chunk_views(lease, list(chunks))):
        lo, hi = chunk_blocks(task.spec.num_tokens, lease.first_chunk + c)
        ids = task.block_ids[lo:hi]
        kv.scatter(ids, view, max(0, min(task.skip_blocks - lo, len(ids))))

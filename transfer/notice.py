"""The NIXL notification that follows each chunk write (versioned, msgpack, no pickle).

It names transfer id, chunk index, lease epoch and producer incarnation so the consumer
can match it against a live lease; `crc` (when the producer computes one) lets the
consumer prove the slot still holds exactly what was sent. `kv_ready_at` (the producer's wall clock
when the chunk's KV was complete: its last range staged, at or near the end of the forward that computed it)
lets the consumer measure how long the request waited for its KV after the prefill ended; meaningful across
hosts only as far as their clocks agree.

A `LeaseFence` is the other notification a producer sends: once it has stopped writing to a lease it did not
fill (its job failed or was aborted), as the notification of a 1-byte WRITE into the `FENCE_BYTES` a consumer
registers after its last slot (fence_writes.py). NIXL sends a write's notification only after flushing the
connection, so the consumer reads the fence after every byte the producer had posted to it, even bytes a cut
link held for minutes (quarantine.py).
"""
from __future__ import annotations

from typing import Literal

import msgpack
from pydantic import BaseModel, ConfigDict, ValidationError

NOTICE_VERSION = 1
MAX_NOTICE_BYTES = 4096
FENCE_BYTES = 64  # registered after a consumer's last slot: where fences' writes land, read by nobody


class NoticeError(ValueError):
    """A notification that is not a valid chunk notice."""


class ChunkNotice(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: int = NOTICE_VERSION
    transfer_id: str
    chunk: int
    epoch: int
    incarnation: str
    nbytes: int
    crc: int | None = None
    kv_ready_at: float | None = None

    def encode(self) -> bytes:
        return msgpack.packb(self.model_dump())


class LeaseFence(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: int = NOTICE_VERSION
    fence: Literal[True] = True
    transfer_id: str
    epoch: int
    incarnation: str

    def encode(self) -> bytes:
        return msgpack.packb(self.model_dump())


def decode_notification(raw: bytes) -> ChunkNotice | LeaseFence:
    """A producer's notification, whichever kind it is; NoticeError for anything else."""
    if len(raw) > MAX_NOTICE_BYTES:
        raise NoticeError(f"notice of {len(raw)} bytes exceeds {MAX_NOTICE_BYTES}")
    try:
        fields = msgpack.unpackb(raw, raw=False)
        kind = LeaseFence if isinstance(fields, dict) and "fence" in fields else ChunkNotice
        notice = kind.model_validate(fields)
    except (ValueError, ValidationError, msgpack.UnpackException, TypeError) as e:
        raise NoticeError(f"malformed chunk notice: {e}") from e
    if notice.v != NOTICE_VERSION:
        raise NoticeError(f"chunk notice version {notice.v}, expected {NOTICE_VERSION}")
    return notice

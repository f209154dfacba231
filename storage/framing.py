"""The header every chunk carries at rest (disk file, Redis value): magic, version, length and a MAC.

Chunk keys can be computed by anyone with the public weights, so whoever can write to Redis or to
the disk tier's directory could put KV under a key that other users' prompts will read. The tag is
HMAC-SHA256 over the chunk key and the payload, keyed by the store key (derived from the deployment
secret): a value written without the key, copied from another key, torn or from another format
version fails it and is read as a miss (counted in `kvbridge_store_rejected_total`), never as KV.
Without a secret the tag is keyed by a fixed constant: it still catches damage, not a forger.
"""
from __future__ import annotations

import hashlib
import hmac
import struct

import numpy as np

MAGIC, VERSION = b"KVBC", 2
HEADER = struct.Struct("<4sIQ32s")
UNKEYED = b"kvbridge/store/unkeyed"


class BadChunk(ValueError):
    pass


def _tag(mac_key: bytes | None, chunk_key: str, payload: np.ndarray) -> bytes:
    h = hmac.new(mac_key or UNKEYED, f"{len(chunk_key)}:{chunk_key}|".encode(), hashlib.sha256)
    h.update(memoryview(payload).cast("B"))
    return h.digest()


def header(mac_key: bytes | None, chunk_key: str, payload: np.ndarray) -> bytes:
    return HEADER.pack(MAGIC, VERSION, payload.nbytes, _tag(mac_key, chunk_key, payload))


def parse_header(raw: bytes, total: int) -> tuple[int, bytes]:
    """(payload bytes, tag) from a header, given the size of the whole framed value."""
    if len(raw) < HEADER.size:
        raise BadChunk(f"{len(raw)} bytes, shorter than the header")
    magic, version, n, tag = HEADER.unpack(raw[:HEADER.size])
    if magic != MAGIC or version != VERSION or total != HEADER.size + n:
        raise BadChunk(f"bad header (magic {magic!r}, version {version}, length {n}, have {total - HEADER.size})")
    return n, tag


def check(mac_key: bytes | None, chunk_key: str, payload: np.ndarray, tag: bytes) -> None:
    if not hmac.compare_digest(_tag(mac_key, chunk_key, payload), tag):
        raise BadChunk("payload does not match its MAC (tampered, damaged, or written under another key)")

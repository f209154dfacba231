"""The header every chunk carries at rest (disk file, Redis value): magic, version, length, crc32.

A reader that gets anything else (a torn or foreign value, a format from another version) treats
the chunk as missing, so bytes at rest are never scattered into KV unverified.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

MAGIC, VERSION = b"KVBC", 1
HEADER = struct.Struct("<4sIQI")


class BadChunk(ValueError):
    pass


def header(payload: np.ndarray) -> bytes:
    return HEADER.pack(MAGIC, VERSION, payload.nbytes, zlib.crc32(payload))


def parse_header(raw: bytes, total: int) -> tuple[int, int]:
    """(payload bytes, crc) from a header, given the size of the whole framed value."""
    if len(raw) < HEADER.size:
        raise BadChunk(f"{len(raw)} bytes, shorter than the header")
    magic, version, n, crc = HEADER.unpack(raw[:HEADER.size])
    if magic != MAGIC or version != VERSION or total != HEADER.size + n:
        raise BadChunk(f"bad header (magic {magic!r}, version {version}, length {n}, have {total - HEADER.size})")
    return n, crc


def check(payload: np.ndarray, crc: int) -> None:
    if zlib.crc32(payload) != crc:
        raise BadChunk("payload does not match its checksum")

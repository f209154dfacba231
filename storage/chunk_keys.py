"""Content keys for KV chunks: a hash chained over the prefix, stable across processes and machines.

Chunk i's key hashes chunk i-1's key with chunk i's token ids, so a key names the whole prefix
up to and including its chunk: equal keys mean equal KV (for the same model and layout, which
seed the chain). blake2b over little-endian int32 token ids, never Python's randomized `hash()`.
Only whole chunks get keys; a ragged tail is always recomputed.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

KEY_VERSION = 1


def chain_seed(identity: str) -> bytes:
    """The chain's starting value: everything besides tokens that changes what KV bytes mean."""
    return hashlib.blake2b(f"kvbridge-chunk-v{KEY_VERSION}|{identity}".encode(), digest_size=16).digest()


def chunk_keys(token_ids: Sequence[int], chunk_tokens: int, seed: bytes) -> list[str]:
    """Hex keys of every whole chunk of `token_ids`, in order."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    keys, prev = [], seed
    for start in range(0, len(token_ids) - chunk_tokens + 1, chunk_tokens):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(np.asarray(token_ids[start:start + chunk_tokens], dtype="<i4").tobytes())
        prev = h.digest()
        keys.append(prev.hex())
    return keys

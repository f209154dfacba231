"""What one transfer is, and the proof it carries.

One transfer is the prompt KV of one engine request, on one TP rank, in one scheduling attempt.
The router's `transfer_id` names an HTTP request; an OpenAI request can become several engine
requests (a list of prompts), so both sides derive the transfer's *key* from the router's id and a
hash of the engine request's own prompt token ids. Neither side needs the other's request ids, and
two prompts of one HTTP request can never share a lease. Duplicate prompts (and `n > 1` children)
share a key: they carry the same KV.

The producer's ALLOC states `num_tokens`, `token_hash` and the weights fingerprint; the consumer
checks them against the request it expects when granting and again before scattering.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

KEY_SEPARATOR = "/"
MAX_TRANSFER_ID = 200


def token_hash(token_ids: Sequence[int]) -> str:
    """blake2b of the prompt's token ids (little-endian int64): stable across processes and hosts."""
    return hashlib.blake2b(np.asarray(token_ids, dtype="<i8").tobytes(), digest_size=16).hexdigest()


def transfer_key(transfer_id: str, prompt_hash: str) -> str:
    """The lease name both sides use for one engine request's prompt KV."""
    return f"{transfer_id[:MAX_TRANSFER_ID]}{KEY_SEPARATOR}{prompt_hash[:16]}"


def transfer_id_of(key: str) -> str:
    """The router's transfer id inside a key (what a router CANCEL names)."""
    return key.rsplit(KEY_SEPARATOR, 1)[0]


@dataclass(frozen=True)
class TransferSpec:
    """One transfer as the producer announces it. `attempt` grows when the engine reschedules the
    request (preemption): a new attempt ends the old one's lease, so no byte of it can be scattered."""
    key: str
    num_tokens: int
    token_hash: str
    attempt: int = 0

    @classmethod
    def for_prompt(cls, transfer_id: str, token_ids: Sequence[int], attempt: int = 0) -> TransferSpec:
        h = token_hash(token_ids)
        return cls(transfer_key(transfer_id, h), len(token_ids), h, attempt)

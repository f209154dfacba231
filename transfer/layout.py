"""KV layout descriptor: everything a peer needs to interpret the bytes we push.

Producer and consumer exchange this in the handshake. Bytes move as opaque
per-block slabs, so the two sides must agree on every field that changes what a
slab means; `differences` explains each disagreement in a sentence a user can act on.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DTYPE_BYTES = {
    "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "uint8": 1,
}

# Fields that must match for a slab to mean the same thing on both sides.
MATCHED_FIELDS = (
    "model_id", "num_layers", "num_kv_heads", "kv_heads_per_rank", "head_size",
    "dtype", "block_size", "cache_layout", "tp_size", "weights_fingerprint",
)


class KVLayout(BaseModel):
    """Shape of one rank's paged KV cache.

    `cache_layout` names how a block is laid out in memory: vLLM's CPU backend uses
    `LBHNC` (per layer `[blocks, heads, block_size, 2*head_size]`, K then V inside a
    (block, head) slab); GPU flash-attn uses `NHD` (`[2, blocks, block_size, heads, head]`)
    and `HND` (`[2, blocks, heads, block_size, head]`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_id: str
    num_layers: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    kv_heads_per_rank: int = Field(gt=0)
    head_size: int = Field(gt=0)
    dtype: str
    block_size: int = Field(gt=0)
    cache_layout: str
    tp_size: int = Field(default=1, gt=0)
    tp_rank: int = Field(default=0, ge=0)
    weights_fingerprint: str = Field(default="", max_length=64,
                                     description="hash of the model's weights: same name, other weights = other KV")

    @property
    def elem_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """K and V, all layers, this rank's heads."""
        return self.num_layers * 2 * self.kv_heads_per_rank * self.head_size * self.elem_bytes

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def chunk_bytes(self, chunk_tokens: int) -> int:
        return self.bytes_per_token * chunk_tokens

    def differences(self, other: KVLayout, mine: str = "producer", theirs: str = "consumer") -> list[str]:
        """One sentence per field that differs, naming both values."""
        out = []
        for name in MATCHED_FIELDS:
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{theirs} has {name}={b!r}, {mine} has {name}={a!r}")
        return out

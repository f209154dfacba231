"""KV layout descriptor: everything a peer needs to interpret the bytes we push.

Producer and consumer exchange this in the handshake. Bytes move as opaque
per-block slabs, so the two sides must agree on every field that changes what a
slab means; `differences` explains each disagreement in a sentence a user can act on.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DTYPE_BYTES = {
    "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "uint8": 1, "int8": 1,
}

# Fields that must match for a slab to mean the same thing on both sides.
MATCHED_FIELDS = (
    "model_id", "num_layers", "num_kv_heads", "kv_heads_per_rank", "head_size",
    "content_size", "dtype", "kv_cache_dtype", "kv_scaled", "block_size", "cache_layout", "tp_size",
    "weights_fingerprint",
)


class KVLayout(BaseModel):
    """Shape of one rank's paged KV cache.

    `cache_layout` is the name vLLM gives the physical order of `[layer, block, head, token,
    content]` (`LBHNC`, `LBNHC`, `LHBNC`, `BLHNC`, `BLNHC`, `BHLNC`). `content_size` is the
    elements per (head, token) cell: K and V side by side (2 x head_size), or MLA's latent vector.
    `dtype` is the element type the cache is stored as; `kv_cache_dtype` the exact variant vLLM
    was asked for (`fp8_e4m3` and `fp8_e5m2` are both stored as bytes) and `kv_scaled` whether
    scales apply to the stored values.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_id: str
    num_layers: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    kv_heads_per_rank: int = Field(gt=0)
    head_size: int = Field(gt=0)
    content_size: int = Field(default=0, ge=0, description="elements per (head, token); 0 = 2 x head_size")
    dtype: str
    kv_cache_dtype: str = Field(default="", max_length=32)
    kv_scaled: bool = False
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
        """K and V (or the latent vector), all layers, this rank's heads."""
        content = self.content_size or 2 * self.head_size
        return self.num_layers * self.kv_heads_per_rank * content * self.elem_bytes

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

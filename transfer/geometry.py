"""Chunk geometry: how many chunks a prompt makes and exactly how many bytes each one holds.

A chunk is `blocks_per_chunk` whole blocks of every layer; the last chunk holds the blocks the
prompt's remaining tokens touch. The consumer sets the geometry (its slot size) and refuses a
producer whose `chunk_tokens` differ; both sides then check every chunk's byte count against its
index, so a chunk can never be larger than its slot or shorter than the KV it claims to carry.
"""
from __future__ import annotations

from dataclasses import dataclass

from transfer.layout import KVLayout


@dataclass(frozen=True)
class ChunkGeometry:
    layout: KVLayout
    chunk_tokens: int

    def __post_init__(self) -> None:
        if self.chunk_tokens % self.layout.block_size:
            raise ValueError(f"chunk_tokens={self.chunk_tokens} is not a whole number of "
                             f"{self.layout.block_size}-token blocks")

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_tokens // self.layout.block_size

    @property
    def slot_bytes(self) -> int:
        return self.layout.chunk_bytes(self.chunk_tokens)

    def n_chunks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.chunk_tokens)

    def block_range(self, num_tokens: int, chunk: int) -> tuple[int, int]:
        """[first, last) block index of the prompt that chunk `chunk` carries."""
        n_blocks = -(-num_tokens // self.layout.block_size)
        lo = chunk * self.blocks_per_chunk
        return lo, min(lo + self.blocks_per_chunk, n_blocks)

    def chunk_nbytes(self, num_tokens: int, chunk: int) -> int:
        lo, hi = self.block_range(num_tokens, chunk)
        return max(0, hi - lo) * self.layout.bytes_per_block

    def all_chunk_nbytes(self, num_tokens: int) -> list[int]:
        return [self.chunk_nbytes(num_tokens, c) for c in range(self.n_chunks(num_tokens))]

"""The tiered store as the worker sees it: chunk keys seeded by what the KV bytes mean.

The worker seeds the key chain with the KV layout it registered (model, layers, heads, dtype,
block size, cache layout, TP size) and a fingerprint of the model's weights (for a hub model id, its
name and the revision vLLM was given), so a chunk is found only by a node whose KV bytes mean the same
thing: regenerated weights under the same name do not read old KV back from disk or Redis. Under
tensor parallelism each rank keeps its own heads' bytes, under the same key plus its rank, and its disk
files in a folder of its own (`rank<r>` under `disk_path`): ranks sharing one folder counted, evicted
and deleted each other's files. Pipeline parallelism is refused: every stage's layout looks the same
(only its layer count is in it), so stages would read each other's layers as their own.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, TypeVar

import torch
from prometheus_client import Counter

from transfer.credentials import derive
from transfer.layout import KVLayout
from storage.chunk_keys import chain_seed
from storage.config import StoreConfig

log = logging.getLogger("kvbridge.store")
R = TypeVar("R")
PROMPT_TOKENS = Counter("kvbridge_store_prompt_tokens_total",
                        "Prompt tokens whose KV was saved to, loaded from, or failed to load from the store",
                        ["outcome"])


def store_key(secret: bytes) -> bytes:
    """The key chunks at rest are MACed with (storage/framing.py): one per deployment."""
    return derive(secret, "store")


def model_fingerprint(model_path: str) -> str:
    """Config plus the first and last MiB of every weight file of a local model; the name otherwise."""
    root = Path(model_path)
    if not root.is_dir():
        return model_path
    h = hashlib.blake2b(digest_size=16)
    for p in sorted(root.iterdir()):
        if p.name == "config.json" or p.suffix in (".safetensors", ".bin", ".pt"):
            size = p.stat().st_size
            h.update(f"{p.name}:{size}".encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read(1 << 20))
    return h.hexdigest()


class PrefixStore:
    def __init__(self, cfg: StoreConfig, layout: KVLayout, chunk_tokens: int, model_path: str,
                 mac_key: bytes | None = None, revision: str | None = None, pp_size: int = 1) -> None:
        if pp_size > 1:
            raise ValueError(f"store: pipeline parallelism (pipeline_parallel_size={pp_size}) is not supported: "
                             "every stage would store its layers' KV under the keys of the others. Remove the "
                             "connector's `store:` section or run with pipeline_parallel_size 1")
        if cfg.disk_path and layout.tp_size > 1:
            cfg = cfg.model_copy(update={"disk_path": str(Path(cfg.disk_path) / f"rank{layout.tp_rank}")})
        self.store = cfg.build(mac_key)
        identity = sorted(layout.model_dump(exclude={"tp_rank"}).items())
        weights = model_fingerprint(model_path) + (f"@{revision}" if revision else "")
        self.seed = chain_seed(f"{identity}|chunk{chunk_tokens}|{weights}")
        self.chunk_tokens = chunk_tokens
        # a load scatters from memory: a prefix longer than memory holds would evict its own first chunks
        self._max_held = self.store.memory.room_for(layout.chunk_bytes(chunk_tokens)) if self.store.memory else None
        if self._max_held == 0:
            log.warning("store: memory_bytes %d is smaller than one chunk (%d bytes): no stored prefix will be "
                        "loaded; raise memory_bytes", cfg.memory_bytes, layout.chunk_bytes(chunk_tokens))
        self._suffix = f".{layout.tp_rank}" if layout.tp_size > 1 else ""
        log.info("store ready: tiers %s", ", ".join(t.name for t in self.store.tiers))

    def lookup(self, keys: list[str]) -> int:
        """How many leading chunks are held (in any tier), at most as many as the memory tier holds at once;
        those held only in cold tiers start coming into memory now, so the load that follows a step later
        finds them there."""
        ks = [k + self._suffix for k in keys][:self._max_held]
        held = len(self.store.lookup(ks))
        self.store.prefetch(ks[:held])
        return held

    def load(self, key: str, use: Callable[[torch.Tensor], R], cold: bool = True) -> R | None:
        """`use(chunk bytes)` if the store holds the chunk (a memory hit is used in place), else None;
        `cold=False`: memory only (pd/store_loads.py waited for the fetch)."""
        return self.store.load(key + self._suffix, use, cold)

    def prefetch(self, keys: list[str]) -> None:
        """Bring `keys` that memory does not hold (any more) into it in the background."""
        self.store.prefetch([k + self._suffix for k in keys])

    def fetching(self, keys: list[str]) -> bool:
        return self.store.fetching([k + self._suffix for k in keys])

    def wait_fetched(self, keys: list[str], timeout_s: float) -> None:
        self.store.wait_fetched([k + self._suffix for k in keys], timeout_s)

    def put(self, key: str, data: torch.Tensor) -> None:
        self.store.put(key + self._suffix, data)

    def close(self) -> None:
        self.store.close()

"""Store loads whose fetches run off the engine thread (the scatter from memory runs on it): vLLM is told
a store hit loads asynchronously, and the request waits, alone, until its chunks are in memory.

The scheduler's lookup already started fetching the chunks that only disk or Redis hold into memory
(storage/prefetcher.py); a load asks again for any chunk memory lost since (evicted), so every chunk it
needs is either in memory or on its way. Each step the worker scatters the requests whose fetches have all
ended, from memory only, and reports them to vLLM as finished receives; a request still waiting for a slow
tier stays in WAITING_FOR_REMOTE_KVS while the others compute. A chunk gone (evicted again, damaged, a tier
that answered "not here", a full prefetch queue) is a load error: vLLM recomputes from it on, as before.
"""
from __future__ import annotations

import logging

import torch

from pd.paged_kv import PagedKV
from pd.prefix_store import PROMPT_TOKENS, PrefixStore
from pd.step_metadata import StoreLoadTask

log = logging.getLogger("kvbridge.store")


class StoreLoads:
    def __init__(self, store: PrefixStore, kv: PagedKV, blocks_per_chunk: int, chunk_tokens: int,
                 load_errors: set[int]) -> None:
        self.store, self.kv = store, kv
        self.blocks_per_chunk, self.chunk_tokens = blocks_per_chunk, chunk_tokens
        self._load_errors = load_errors   # the worker's: reported to vLLM with the step's results
        self._pending: dict[str, StoreLoadTask] = {}

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def add(self, task: StoreLoadTask) -> None:
        self.store.prefetch(task.keys)
        self._pending[task.req_id] = task

    def drop(self, req_id: str) -> bool:
        """The request ended while loading: nothing to scatter; True if it was loading (vLLM still waits for
        its id as a finished receive before it frees the blocks)."""
        return self._pending.pop(req_id, None) is not None

    def finished(self) -> set[str]:
        """Requests whose chunks all came (or are known gone), scattered now from memory."""
        done = {rid for rid, task in self._pending.items() if not self.store.fetching(task.keys)}
        for rid in done:
            self._scatter(self._pending.pop(rid))
        return done

    def wait(self, timeout_s: float) -> None:
        """Until the oldest pending load's next chunk arrives, at most `timeout_s` (an idle engine's step)."""
        if self._pending:
            self.store.wait_fetched(next(iter(self._pending.values())).keys, timeout_s)

    def _scatter(self, task: StoreLoadTask) -> None:
        """Scatter stored chunks into the request's blocks; from the first chunk that is gone on, report the
        blocks we were to fill as load errors so vLLM recomputes them."""
        expect = self.kv.chunk_nbytes(self.blocks_per_chunk)
        loaded, bpc = 0, self.blocks_per_chunk
        for i, key in enumerate(task.keys):
            c = task.first_chunk + i
            ids = task.block_ids[c * bpc:(c + 1) * bpc]
            skip = max(0, task.skip_blocks - c * bpc)

            def scatter(data: torch.Tensor, ids: list[int] = ids, skip: int = skip) -> int:
                if data.numel() == expect:
                    # the store's slot is reused once we return: a blocking copy to the cache's device
                    self.kv.scatter(ids, data.to(self.kv.device), skip)
                return data.numel()
            got = self.store.load(key, scatter, cold=False)
            if got != expect:
                # blocks before skip_blocks are vLLM's own prefix-cache hit, maybe shared with running requests:
                # valid, so never reported (vLLM would recompute, or fail, every request that shares them)
                first_bad = max(c * bpc, task.skip_blocks)
                self._load_errors.update(task.block_ids[first_bad:(task.first_chunk + len(task.keys)) * bpc])
                PROMPT_TOKENS.labels("load_failed").inc((len(task.keys) - i) * self.chunk_tokens)
                log.warning("request %s: stored chunk %d is gone (%s); its blocks will be recomputed", task.req_id,
                            c, "missing" if got is None else f"{got} bytes, expected {expect}")
                break
            loaded += self.chunk_tokens - skip * self.kv.layout.block_size
        PROMPT_TOKENS.labels("loaded").inc(loaded)
        log.debug("request %s: %d prompt tokens loaded from the store", task.req_id, loaded)

"""Store loads vLLM is told are asynchronous (pd/store_loads.py) with a real tiered store: a request whose
chunks sit in a slow tier waits alone while one whose chunks are in memory is scattered at once, the slow
tier is read only by the prefetch thread (never the engine's), and the bytes scattered are the bytes stored."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import torch

from pd.prefix_store import PrefixStore
from pd.step_metadata import StoreLoadTask
from pd.store_loads import StoreLoads
from storage.config import StoreConfig
from storage.disk_tier import DiskTier
from storage.memory_tier import MemoryTier
from storage.tiered_store import TieredStore
from transfer.layout import KVLayout

BLOCK, BPC = 4, 2            # 2 blocks of 4 tokens per chunk
CHUNK_BYTES = 4096


def chunk(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (CHUNK_BYTES,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


class FakeKV:
    """What StoreLoads needs of PagedKV: records which bytes went to which blocks."""
    device = torch.device("cpu")
    layout = SimpleNamespace(block_size=BLOCK)

    def __init__(self) -> None:
        self.blocks: dict[tuple[int, ...], torch.Tensor] = {}

    def chunk_nbytes(self, blocks: int) -> int:
        assert blocks == BPC
        return CHUNK_BYTES

    def scatter(self, ids: list[int], data: torch.Tensor, skip: int) -> None:
        self.blocks[tuple(ids)] = data.clone()


class GatedDisk(DiskTier):
    """A disk that stalls (a slow tier) until the test opens the gate, and notes who read it."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.gate, self.readers = threading.Event(), set()

    def get(self, key, into=None):
        self.readers.add(threading.current_thread().name)
        self.gate.wait(30)
        return super().get(key, into)


def test_a_slow_tier_holds_up_only_the_request_that_needs_it(tmp_path):
    disk = GatedDisk(tmp_path, 1 << 20, name="gated")
    store = TieredStore([MemoryTier(1 << 20), disk])
    disk.put("cold0", chunk(0))
    disk.put("cold1", chunk(1))
    store.memory.put("warm0", chunk(2))
    kv, errors = FakeKV(), set()
    loads = StoreLoads(store, kv, BPC, BPC * BLOCK, errors)
    store.prefetch(["cold0", "cold1"])   # what the scheduler's lookup did

    loads.add(StoreLoadTask("slow", ["cold0", "cold1"], 0, [10, 11, 12, 13], 0))
    loads.add(StoreLoadTask("fast", ["warm0"], 0, [20, 21], 0))
    assert loads.finished() == {"fast"} and loads.pending, "the memory hit does not wait for the slow tier"
    assert torch.equal(kv.blocks[(20, 21)], chunk(2))
    loads.wait(0.05)   # an idle engine's step: waits a little, never past its timeout
    assert loads.finished() == set()

    disk.gate.set()
    while loads.pending:
        loads.wait(5)
        assert loads.finished() <= {"slow"}
    assert torch.equal(kv.blocks[(10, 11)], chunk(0)) and torch.equal(kv.blocks[(12, 13)], chunk(1))
    assert not errors
    assert disk.readers == {"kvbridge-store-prefetch"}, "only the prefetch thread read the slow tier"
    store.close()


def test_a_chunk_gone_is_a_load_error_from_it_on_and_an_ended_request_is_dropped(tmp_path):
    store = TieredStore([MemoryTier(1 << 20), DiskTier(tmp_path, 1 << 20)])
    store.memory.put("k0", chunk(0))
    kv, errors = FakeKV(), set()
    loads = StoreLoads(store, kv, BPC, BPC * BLOCK, errors)
    loads.add(StoreLoadTask("r", ["k0", "gone", "k2"], 0, [1, 2, 3, 4, 5, 6], 0))
    loads.add(StoreLoadTask("ended", ["gone"], 0, [7, 8], 0))
    assert loads.drop("ended") and not loads.drop("ended")
    done: set[str] = set()
    while loads.pending:   # the missing chunks were asked of the disk tier first (by the prefetch thread)
        loads.wait(5)
        done |= loads.finished()
    assert done == {"r"}
    assert torch.equal(kv.blocks[(1, 2)], chunk(0)) and errors == {3, 4, 5, 6}
    store.close()


def test_a_load_error_never_reports_blocks_of_vllms_own_prefix_cache_hit(tmp_path):
    """vLLM's prefix cache held the first block of chunk 0 (shared with other running requests); the store's
    chunk 0 is gone: only the block the store was to fill is a load error."""
    store = TieredStore([MemoryTier(1 << 20), DiskTier(tmp_path, 1 << 20)])
    kv, errors = FakeKV(), set()
    loads = StoreLoads(store, kv, BPC, BPC * BLOCK, errors)
    loads.add(StoreLoadTask("r", ["gone", "gone too"], 0, [1, 2, 3, 4], 1))
    while loads.pending:
        loads.wait(5)
        loads.finished()
    assert errors == {2, 3, 4}, "block 1 is vLLM's valid cached block"
    store.close()


def test_a_memory_only_load_does_not_wait_for_a_fetch_in_flight(tmp_path):
    """The engine thread scatters with cold=False: a chunk some other lookup is fetching again right then is a
    miss (a load error, recomputed), not up to prefetch_wait_s of the engine's time per chunk."""
    disk = GatedDisk(tmp_path, 1 << 20, name="gated-wait")
    store = TieredStore([MemoryTier(1 << 20), disk], prefetch_wait_s=5.0)
    disk.put("cold0", chunk(0))
    store.prefetch(["cold0"])
    assert store.fetching(["cold0"])
    t0 = time.monotonic()
    assert store.load("cold0", len, cold=False) is None
    assert time.monotonic() - t0 < 2.5, "the engine thread waited for the fetch"
    disk.gate.set()
    store.close()


def test_a_lookup_reports_held_no_more_chunks_than_memory_holds_at_once(tmp_path):
    """Four chunks on disk, room for two in memory: fetching chunks 2 and 3 evicted chunks 0 and 1, so the load
    failed from chunk 0 on and the whole prefix was recomputed after waiting for every disk read."""
    layout = KVLayout(model_id="tiny", num_layers=1, num_kv_heads=1, kv_heads_per_rank=1, head_size=256,
                      dtype="uint8", block_size=BLOCK, cache_layout="LBHNC")
    assert layout.chunk_bytes(BPC * BLOCK) == CHUNK_BYTES
    cfg = StoreConfig(memory_bytes=2 * CHUNK_BYTES, disk_path=str(tmp_path), disk_bytes="1MiB")
    store = PrefixStore(cfg, layout, BPC * BLOCK, "org/hub-model")
    keys = [f"{i:032x}" for i in range(4)]
    for i, k in enumerate(keys):
        store.put(k, chunk(i))
        assert store.store.flush(5)
    store.store.memory.clear()
    held = store.lookup(keys)
    assert held == 2
    kv, errors = FakeKV(), set()
    loads = StoreLoads(store, kv, BPC, BPC * BLOCK, errors)
    loads.add(StoreLoadTask("r", keys[:held], 0, list(range(2 * held)), 0))
    while loads.pending:
        loads.wait(5)
        loads.finished()
    assert not errors and [torch.equal(kv.blocks[(2 * i, 2 * i + 1)], chunk(i)) for i in range(held)] == [True] * 2
    store.close()

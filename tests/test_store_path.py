"""The store off the engine's path: arena slots, borrowed bytes that eviction cannot change, and lookups
that answer within their budget while Redis is stopped (SIGSTOP)."""
from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import torch

from launch.redis_server import RedisServer
from pd.scheduler_side import SchedulerSide
from pd.store_lookup import StoreLookups
from storage.arena import Arena
from storage.chunk_keys import chain_seed, chunk_keys
from storage.memory_tier import MemoryTier
from storage.redis_tier import RedisTier
from storage.tiered_store import TieredStore


def chunk(n: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def test_arena_reuses_and_merges_freed_ranges():
    arena = Arena(4 * 4096, pin=False)
    offs = [arena.alloc(4096) for _ in range(4)]
    assert offs == [0, 4096, 8192, 12288] and arena.alloc(1) is None
    arena.free(offs[1], 4096)
    arena.free(offs[2], 4096)
    assert arena.alloc(8192) == 4096, "two freed neighbours make one range"
    arena.free(4096, 8192)
    arena.free(0, 4096)
    arena.free(12288, 4096)
    assert arena.free_bytes() == 4 * 4096 and arena.alloc(4 * 4096) == 0


def test_a_borrowed_slot_keeps_its_bytes_through_eviction():
    tier = MemoryTier(2 * 4096)
    tier.put("a", chunk(seed=1))
    slot = tier.hold("a")
    for i in range(10):
        tier.put(f"k{i}", chunk(seed=10 + i))
        assert tier.used <= tier.capacity
    assert tier.keys() == ["a", "k9"], "a borrowed chunk is not evicted; the others cycle through the rest"
    assert torch.equal(slot.data, chunk(seed=1)), "a borrowed slot was written over"
    tier.release(slot)
    for i in range(10):
        assert tier.put(f"m{i}", chunk(seed=30 + i))
    assert tier.keys() == ["m8", "m9"], "the released slot went back to the arena"
    assert torch.equal(tier.get("m9"), chunk(seed=39))


def test_store_load_uses_memory_in_place_and_promotes_cold_hits():
    cold = MemoryTier(1 << 20, name="cold")
    store = TieredStore([MemoryTier(1 << 20), cold])
    store.put("a" * 32, chunk(seed=2))
    assert store.flush(5) and cold.keys() == ["a" * 32]
    ptrs = []
    assert store.load("a" * 32, lambda d: ptrs.append(d.data_ptr()) or d.numel()) == 4096
    assert store.load("a" * 32, lambda d: d.data_ptr()) == ptrs[0], "a memory hit is read in place"
    store.memory.close()
    assert store.load("a" * 32, lambda d: torch.equal(d, chunk(seed=2))) is True
    assert store.memory.keys() == ["a" * 32], "a cold hit is promoted to memory"
    assert store.load("b" * 32, lambda d: 1) is None
    store.close()


def test_lookup_answers_miss_within_budget_while_redis_is_stopped():
    server = RedisServer()
    budget = 0.05
    store = TieredStore([MemoryTier(1 << 20), RedisTier(server.url, timeout_s=2.0, retry_s=5.0)],
                        remote_budget_s=budget)
    try:
        keys = [f"{i:032x}" for i in range(4)]
        for i, k in enumerate(keys):
            store.tiers[1].put(k, chunk(seed=i))
        store.put(keys[0], chunk(seed=0))
        assert store.lookup(keys) == ["memory", "redis", "redis", "redis"]
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            worst = 0.0
            for _ in range(20):
                t0 = time.perf_counter()
                assert store.lookup(keys) == ["memory"], "a stopped Redis holds nothing"
                worst = max(worst, time.perf_counter() - t0)
            # the bound is the budget plus scheduling noise on a loaded machine, far under Redis's 2 s timeout
            assert worst < budget + 0.5, f"a lookup waited {worst:.3f}s with Redis stopped"
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while store.lookup(keys) != ["memory", "redis", "redis", "redis"]:
            assert time.monotonic() < deadline, "Redis answered lookups again after SIGCONT"
            time.sleep(0.1)
    finally:
        store.close()
        server.stop()


class HeldClient:
    """A lookup client whose worker holds the prompt's first two chunks of 4 tokens; counts its questions."""
    chunk_tokens, asked = 4, 0

    def keys(self, tokens: list[int]) -> list[str]:
        return chunk_keys(tokens, 4, chain_seed("x"))

    def ask(self, keys: list[str]) -> int:
        self.asked += 1
        return self.asked

    def answer(self, lookup: int, wait_s: float) -> int | None:
        return 2

    def forget(self, lookup: int) -> None:
        pass


def store_scheduler() -> tuple[SchedulerSide, HeldClient]:
    side = SchedulerSide(block_size=4, is_producer=True, is_consumer=False, store_lookup_timeout_s=1.0)
    side._lookups = StoreLookups([client := HeldClient()], 1.0)
    return side, client


def test_the_scheduler_asks_once_per_request_and_forgets_it_when_it_finishes():
    side, client = store_scheduler()
    req = SimpleNamespace(request_id="r1", prompt_token_ids=list(range(13)), kv_transfer_params=None,
                          num_preemptions=0)
    assert [side.get_num_new_matched_tokens(req, computed) for computed in (0, 0, 4, 0, 8)] == \
        [(8, True), (8, True), (4, True), (8, True), (0, False)]   # loaded asynchronously; once loaded, nothing
    assert client.asked == 1, "later steps of a waiting request must not ask the worker again"
    side.request_finished(req, [])
    assert side.get_num_new_matched_tokens(req, 0) == (8, True) and client.asked == 2


def test_a_request_whose_store_load_failed_computes_its_prompt_instead_of_loading_again():
    """vLLM asks again after a failed load (the chunk was cleared or evicted between lookup and load); the
    store's index may still list it, and answering the same hit again loaded the same missing chunk again,
    forever (16 000 reschedules a request in one whole-suite run, the client waiting until it gave up)."""
    side, client = store_scheduler()
    req = SimpleNamespace(request_id="r1", prompt_token_ids=list(range(13)), kv_transfer_params=None,
                          num_preemptions=0)
    assert side.get_num_new_matched_tokens(req, 0) == (8, True)
    side.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: ([0, 1, 2, 3],)), 8)
    assert [t.keys for t in side.build_connector_meta(SimpleNamespace(
        total_num_scheduled_tokens=0, preempted_req_ids=(), scheduled_new_reqs=[],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[]))).store_loads] == [client.keys(list(range(13)))[:2]]
    assert side.get_num_new_matched_tokens(req, 0) == (0, False), "the failed load's request computes its prompt"
    side.request_finished(req, [])
    assert side.get_num_new_matched_tokens(req, 0) == (8, True), "a later request with that id may load again"



def test_a_slot_whose_device_copy_is_still_queued_is_not_read():
    """On a GPU a put queues its copy and records a fence; until the fence is done the bytes are not there."""
    class Late:
        ready = False

        def done(self) -> bool:
            return self.ready

    tier = MemoryTier(1 << 20)
    slot = tier.put_held("a", chunk(seed=5))
    slot.fence = late = Late()
    tier.release(slot)
    assert tier.contains(["a"]) == [True], "the lookup counts it: it will be there by the time a load runs"
    assert tier.hold("a") is None and tier.get("a") is None, "read before its copy completed"
    late.ready = True
    assert torch.equal(tier.get("a"), chunk(seed=5))


def test_a_disk_hit_is_read_into_a_memory_slot(tmp_path):
    from storage.disk_tier import DiskTier

    store = TieredStore([MemoryTier(3 * 4096), DiskTier(tmp_path, 1 << 20)])
    for i in range(4):
        store.put(f"{i:032x}", chunk(seed=i))
        assert store.flush(5)
    assert store.memory.keys() == [f"{i:032x}" for i in (1, 2, 3)]
    assert store.load(f"{0:032x}", lambda d: torch.equal(d, chunk(seed=0))) is True
    assert store.memory.keys()[-1] == f"{0:032x}" and store.memory.used <= store.memory.capacity
    assert store.load(f"{0:032x}", lambda d: torch.equal(d, chunk(seed=0))) is True, "now a memory hit"
    (tmp_path / "00" / f"{1:032x}.kvc").write_bytes(b"KVBC damaged")
    store.memory.close()
    assert store.load(f"{1:032x}", lambda d: 1) is None, "a damaged file is a miss"
    assert store.memory.keys() == [] and store.memory._arena.free_bytes() == 3 * 4096, "its reserved slot came back"
    store.close()


def test_prefetch_brings_cold_chunks_into_memory_and_a_load_waits_for_it(tmp_path):
    from storage.disk_tier import DiskTier
    from storage.tier import HITS

    class SlowDisk(DiskTier):
        def get(self, key, into=None):
            time.sleep(0.1)  # the load below comes while the prefetch is still reading
            return super().get(key, into)

    disk = SlowDisk(tmp_path, 1 << 20, name="slowdisk")
    keys = [f"{i:032x}" for i in range(3)]
    for i, k in enumerate(keys):
        disk.put(k, chunk(seed=i))
    store = TieredStore([MemoryTier(1 << 20), disk])
    store.prefetch(keys)
    assert [store.load(k, lambda d, i=i: torch.equal(d, chunk(seed=i))) for i, k in enumerate(keys)] == [True] * 3
    assert store.memory.keys() == keys
    store.prefetch(keys)  # all in memory now: nothing to fetch
    assert store.load(keys[2], len) == 4096
    assert HITS.labels("slowdisk")._value.get() == 3, "each chunk is read from disk once, by the prefetch"
    store.close()

    from launch.polling import wait_for
    fresh = TieredStore([MemoryTier(1 << 20), disk])
    fresh.prefetch(keys)
    wait_for(lambda: fresh.memory.keys() == keys, 10, what="prefetched chunks in memory, with no load asking")
    assert HITS.labels("slowdisk")._value.get() == 6
    fresh.close()


def test_a_chunk_file_removed_right_after_its_read_is_still_loaded(tmp_path):
    """An admin clear (or an eviction) removes the file between the read and the touch that keeps the LRU
    order: the bytes read are whole, so the load uses them and raises nothing."""
    from storage.disk_tier import DiskTier

    class ClearedDuringRead(DiskTier):
        def _read(self, path, key, into):
            data = super()._read(path, key, into)
            path.unlink()
            return data

    disk = ClearedDuringRead(tmp_path, 1 << 20)
    disk.put("a" * 32, chunk(seed=1))
    store = TieredStore([MemoryTier(4 * 4096), disk])
    assert store.load("a" * 32, lambda d: torch.equal(d, chunk(seed=1))) is True
    assert store.memory.keys() == ["a" * 32]
    assert store.memory._arena.free_bytes() == 3 * 4096, "one slot holds the chunk, nothing else is taken"
    store.close()


def test_a_disk_read_that_raises_gives_its_reserved_memory_slot_back(tmp_path):
    """The prefetch thread reads a chunk into a reserved slot; a read that raises after the reservation must
    not keep the slot (arena space lost for good)."""
    from storage.disk_tier import DiskTier

    class Failing(DiskTier):
        def get(self, key, into=None):
            into(4096)
            raise RuntimeError("a tier bug")

    disk = Failing(tmp_path, 1 << 20)
    DiskTier.put(disk, "a" * 32, chunk(seed=1))
    store = TieredStore([MemoryTier(4 * 4096), disk])
    store.prefetch(["a" * 32])
    store.wait_fetched(["a" * 32], 5)
    assert not store.fetching(["a" * 32])
    assert store.memory.keys() == [] and store.memory._arena.free_bytes() == 4 * 4096
    store.close()


def test_a_key_put_twice_at_once_keeps_one_slot_and_frees_the_other():
    """A put copies outside the lock; the prefetch thread may commit the same key meanwhile. The key must end
    up in one slot, the other given back (it was held under no key, its bytes lost to the arena for good)."""
    tier = MemoryTier(4 * 4096)
    view = tier._arena.view

    def racing_view(offset: int, nbytes: int) -> torch.Tensor:
        tier._arena.view = view
        assert tier.put("a", chunk(seed=1)), "the other thread's put lands during our copy"
        return view(offset, nbytes)

    tier._arena.view = racing_view
    slot = tier.put_held("a", chunk(seed=1))
    tier.release(slot)
    assert tier.keys() == ["a"] and tier.used == 4096
    assert torch.equal(tier.get("a"), chunk(seed=1))
    tier.clear()
    assert tier.used == 0 and tier._arena.free_bytes() == 4 * 4096, "a slot was lost"

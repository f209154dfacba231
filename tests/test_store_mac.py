"""Stored chunks carry a MAC keyed by the deployment's store key: whoever can write to Redis or to the
disk tier's directory, but lacks the key, cannot make a node load their bytes as KV."""
from __future__ import annotations

import redis
import torch
from prometheus_client import REGISTRY

from storage.disk_tier import DiskTier
from storage.framing import HEADER
from storage.redis_tier import RedisTier

KEY = b"k" * 32
CHUNK_KEY = "ab" * 16


def chunk(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def counted(name: str, tier: str) -> float:
    return REGISTRY.get_sample_value(name, {"tier": tier}) or 0.0


def test_tampered_disk_file_is_a_counted_miss(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, name="disk-mac", mac_key=KEY)
    assert tier.put(CHUNK_KEY, chunk(1)) and torch.equal(tier.get(CHUNK_KEY), chunk(1))
    path = tmp_path / CHUNK_KEY[:2] / f"{CHUNK_KEY}.kvc"
    # An attacker with write access to the directory replaces the payload, keeping the header intact
    # (a CRC-only header would now just be recomputed by the attacker; the MAC cannot be).
    path.write_bytes(path.read_bytes()[:HEADER.size] + chunk(2).numpy().tobytes())
    rejected, misses = counted("kvbridge_store_rejected_total", "disk-mac"), counted("kvbridge_store_misses_total",
                                                                                   "disk-mac")
    assert tier.get(CHUNK_KEY) is None and not path.exists()
    assert counted("kvbridge_store_rejected_total", "disk-mac") == rejected + 1
    assert counted("kvbridge_store_misses_total", "disk-mac") == misses + 1


def test_disk_file_written_without_the_key_or_copied_to_another_key_is_a_miss(tmp_path):
    forger = DiskTier(tmp_path, 1 << 20, name="disk-forger", mac_key=b"not-the-key")
    forger.put(CHUNK_KEY, chunk(3))
    honest = DiskTier(tmp_path, 1 << 20, name="disk-honest", mac_key=KEY)
    assert honest.get(CHUNK_KEY) is None
    honest.put("cd" * 16, chunk(4))
    other = tmp_path / "ee" / f"{'ee' * 16}.kvc"
    other.parent.mkdir()
    other.write_bytes((tmp_path / "cd" / f"{'cd' * 16}.kvc").read_bytes())  # a valid value under another key
    assert DiskTier(tmp_path, 1 << 20, name="disk-honest", mac_key=KEY).get("ee" * 16) is None


def test_tampered_redis_value_is_a_counted_miss(redis_url):
    tier = RedisTier(redis_url, prefix="kvbridge-test:mac:", name="redis-mac", mac_key=KEY)
    assert tier.put(CHUNK_KEY, chunk(5)) and torch.equal(tier.get(CHUNK_KEY), chunk(5))
    raw_key = "kvbridge-test:mac:" + CHUNK_KEY
    client = redis.Redis.from_url(redis_url)
    raw = client.get(raw_key)
    client.set(raw_key, raw[:HEADER.size] + chunk(6).numpy().tobytes())
    before = counted("kvbridge_store_rejected_total", "redis-mac")
    assert tier.get(CHUNK_KEY) is None
    assert counted("kvbridge_store_rejected_total", "redis-mac") == before + 1
    RedisTier(redis_url, prefix="kvbridge-test:mac:", name="redis-forger", mac_key=b"guess").put(CHUNK_KEY, chunk(7))
    assert tier.get(CHUNK_KEY) is None, "a value written by a node without the store key is not loaded"
    assert counted("kvbridge_store_rejected_total", "redis-mac") == before + 2
    client.delete(raw_key)


def test_a_value_that_fails_its_mac_is_deleted_from_redis(redis_url):
    """Left in place it answers EXISTS: every lookup reports the chunk held, every load misses it."""
    prefix = "kvbridge-test:del:"
    tier = RedisTier(redis_url, prefix=prefix, name="redis-del", mac_key=KEY)
    RedisTier(redis_url, prefix=prefix, name="redis-rotated", mac_key=b"old secret").put(CHUNK_KEY, chunk(8))
    assert tier.contains([CHUNK_KEY]) == [True]
    assert tier.get(CHUNK_KEY) is None
    assert tier.contains([CHUNK_KEY]) == [False], "the bad value is gone: the chunk is computed and stored again"

    class Racing(RedisTier):
        """An honest node rewrites the chunk between our read of the bad value and our delete."""
        def _delete_bad(self, key, raw):
            tier.put(key, chunk(9))
            super()._delete_bad(key, raw)

    RedisTier(redis_url, prefix=prefix, name="redis-rotated", mac_key=b"old secret").put(CHUNK_KEY, chunk(8))
    assert Racing(redis_url, prefix=prefix, name="redis-del", mac_key=KEY).get(CHUNK_KEY) is None
    assert torch.equal(tier.get(CHUNK_KEY), chunk(9)), "a value written since the bad read is kept"
    tier.clear()


def test_deployments_sharing_a_redis_do_not_see_each_others_chunks(redis_url):
    ours = RedisTier(redis_url, name="redis-ours", mac_key=b"this test's deployment key")
    theirs = RedisTier(redis_url, name="redis-theirs", mac_key=b"another deployment's key")
    assert ours.put(CHUNK_KEY, chunk(10))
    assert theirs.contains([CHUNK_KEY]) == [False] and theirs.get(CHUNK_KEY) is None
    assert theirs.clear() == 0 and torch.equal(ours.get(CHUNK_KEY), chunk(10)), "their clear leaves ours"
    assert ours.clear() == 1

"""The store's admin listener with a real store (memory, disk, Redis): stats and clear as `kvbridge store`
sends them, only for the admin credential, and a clear that leaves a load in progress its bytes."""
from __future__ import annotations

import pytest
import redis
import torch
import zmq

from launch.local_servers import free_port
from launch.store_cli import StoreAdminError, ask_store
from storage.admin_messages import StoreAdminRequest, decode_report, encode
from storage.admin_server import StoreAdminServer
from storage.config import StoreConfig
from transfer.control_auth import Credential

SECRET = b"s" * 32
CHUNK = 64 * 1024


def chunk(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (CHUNK,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def admin(tmp_path, redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    store = StoreConfig(memory_bytes=8 * CHUNK, disk_path=str(tmp_path), redis_url=redis_url).build(b"k" * 32)
    server = StoreAdminServer(store, "127.0.0.1", free_port(), SECRET)
    yield store, server
    server.close()
    store.close()


def test_stats_and_clear_reach_every_tier(admin, tmp_path):
    store, server = admin
    for i in range(5):
        store.put(f"key{i}", chunk(i))
    assert store.flush(10)
    report = ask_store(server.address, "stats", SECRET)
    assert {n: t.chunks for n, t in report.tiers.items()} == {"memory": 5, "disk": 5, "redis": 5}
    assert report.tiers["memory"].used_bytes == 5 * CHUNK and report.tiers["memory"].capacity_bytes == 8 * CHUNK

    cleared = ask_store(server.address, "clear", SECRET)
    assert {n: t.removed for n, t in cleared.tiers.items()} == {"memory": 5, "disk": 5, "redis": 5}
    assert {n: (t.chunks, t.used_bytes) for n, t in cleared.tiers.items()} == {n: (0, 0) for n in cleared.tiers}
    assert all(store.get(f"key{i}") is None for i in range(5))
    assert not list(tmp_path.glob("*/*.kvc")), "the disk tier's files are gone"
    assert store.memory._arena.free_bytes() == 8 * CHUNK, "the arena is back to full"
    store.put("after", chunk(9))
    assert torch.equal(store.get("after"), chunk(9)), "the store keeps working after a clear"


def test_only_the_admin_credential_is_answered(admin):
    store, server = admin
    store.put("key", chunk(1))
    for secret in (b"x" * 32, None):
        with pytest.raises(StoreAdminError, match="refused|unauthenticated|credential"):
            ask_store(server.address, "clear", secret, timeout_s=5)
    sock = zmq.Context.instance().socket(zmq.DEALER)   # the router's credential, valid elsewhere, is not admin
    sock.connect(f"tcp://{server.address}")
    cred = Credential("router", SECRET)
    frame, nonce = cred.seal(encode(StoreAdminRequest(op="clear")))
    sock.send(frame)
    assert sock.poll(5000)
    assert decode_report(cred.open_reply(sock.recv(), nonce)).ok is False
    sock.close(0)
    assert torch.equal(store.get("key"), chunk(1)), "a refused clear removed nothing"


def test_a_clear_during_a_load_leaves_the_loading_request_its_bytes(admin):
    store, server = admin
    store.put("key", chunk(3))
    assert store.flush(10)
    seen = {}

    def use(data: torch.Tensor) -> bool:
        seen["removed"] = ask_store(server.address, "clear", SECRET).tiers["memory"].removed  # while we borrow
        store.put("other", chunk(4))   # a put after the clear may take any free range, never the borrowed one
        return torch.equal(data, chunk(3))
    assert store.load("key", use) is True
    assert seen["removed"] == 1
    assert store.get("key") is None
    assert torch.equal(store.get("other"), chunk(4))

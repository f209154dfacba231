"""Shared fixtures: one tiny model and one aggregated + prefill + decode vLLM trio for the whole run."""
from __future__ import annotations

import os

import pytest
import redis

from launch.local_servers import MODEL_DIR, SERVED_MODEL, free_port, start_router, start_vllm
from launch.polling import wait_for
from launch.redis_server import RedisServer
from launch.tiny_model import make_tiny_model
from router.config import RouterConfig
from tests.pd_client import pool_status
from tests.hosts_fixtures import hosts  # noqa: F401 (fixture: prefill, decode, router on three namespaces)
from tests.router_stubs import make  # noqa: F401 (fixture: a router in front of stub backends)

PREFILL_EXTRA = {"checksum": True, "alloc_timeout_s": 3.0, "lease_ttl_s": 3.0}
DECODE_EXTRA = {"checksum": True, "load_timeout_s": 4.0, "no_show_s": 0.5, "num_slots": 32, "quarantine_s": 0.5}


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_model(MODEL_DIR)


@pytest.fixture(scope="session")
def redis_url():
    """launch/test.sh's redis-server when it runs one, else one of our own for this run."""
    url = os.environ.get("KVBRIDGE_TEST_REDIS_URL")
    if url:
        redis.Redis.from_url(url).flushdb()
        yield url
        return
    server = RedisServer(maxmemory="256mb")
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def servers(tiny_model, redis_url, store_dir):
    """Started together (they load in parallel), shared by every end-to-end test. The prefill node
    keeps prefills in the tiered store (memory, disk, Redis) instead of vLLM's own prefix cache, so
    every repeated prompt in the suite also exercises the store's load path. Its Redis socket timeout (2 s)
    is longer than its lookup timeout (1 s): a lookup that waited on a stopped Redis would time out, which
    tests/test_store_e2e.py can tell from a lookup the loaded machine answered late."""
    prefill_extra = dict(PREFILL_EXTRA, metrics_port=free_port(),
                         store={"memory_bytes": "64MiB", "disk_path": str(store_dir), "disk_bytes": "256MiB",
                                "redis_url": redis_url, "redis_timeout_s": 2.0, "lookup_timeout_s": 1.0,
                                "admin_port": free_port()})
    details = ("--enable-prompt-tokens-details",)  # usage's cached tokens, compared by tests/test_router_e2e.py
    trio = {"agg": start_vllm("agg", vllm_args=details),
            "decode": start_vllm("decode-0", "decode", DECODE_EXTRA, vllm_args=details),
            "prefill": start_vllm("prefill-0", "prefill", prefill_extra, vllm_args=(*details, "--no-enable-prefix-caching"))}
    try:
        for s in trio.values():
            s.wait_ready()
        yield trio
    finally:
        for s in trio.values():
            s.stop()


@pytest.fixture(scope="session")
def one_slot_decode(servers):
    """The shared prefill and aggregated nodes with a decode node of its own: one slot, so any prompt of
    more than one chunk (256 tokens) streams through its window; a 3 s load timeout."""
    decode = start_vllm("decode-one-slot", "decode", dict(DECODE_EXTRA, num_slots=1, load_timeout_s=3.0))
    try:
        decode.wait_ready()
        yield {"agg": servers["agg"], "prefill": servers["prefill"], "decode": decode}
    finally:
        decode.stop()


@pytest.fixture
def decode_pool_full_after(servers):
    """Every test that moves KV must leave the decode slot pool 100 % free."""
    yield
    handshake = servers["decode"].handshake
    try:
        wait_for(lambda: (st := pool_status(handshake)).free == st.total, 10)
    except TimeoutError:
        raise AssertionError(f"decode pool not back to full: {pool_status(handshake)}") from None


@pytest.fixture(scope="session")
def router(servers):
    """The kvbridge router in front of the shared prefill and decode nodes, quick to notice a dead node
    (1.5 s) but not so quick that one slow /health on two loaded cores takes the prefill node out: with it
    down, every request is prefilled on the decode node and no KV moves."""
    prefill, decode = servers["prefill"], servers["decode"]
    r = start_router(RouterConfig(port=free_port(), model=SERVED_MODEL, health_interval_s=0.5, unhealthy_after=3,
                                  health_timeout_s=2.0,
                                  prefill=[{"name": prefill.name, "url": prefill.url}],
                                  decode=[{"name": decode.name, "url": decode.url,
                                           "kv_address": decode.handshake}]))
    yield r
    r.stop()


_REPORT: list[dict] = []


@pytest.fixture
def failure_report(request):
    """Failure tests record what they measured; the table is printed at the end of the run (and is the
    one in the issue notes: scenario, what happened, time to detect, time to recover, leaks)."""
    def add(scenario: str, happened: str, detect_s: float | None, recover_s: float | None, leaks: str) -> None:
        _REPORT.append({"scenario": scenario, "happened": happened, "detect_s": detect_s, "recover_s": recover_s,
                        "leaks": leaks, "command": f"bash launch/test.sh '{request.node.nodeid}'"})
    return add


def pytest_terminal_summary(terminalreporter):
    if not _REPORT:
        return
    fmt = lambda v: "-" if v is None else f"{v:.2f} s"  # noqa: E731
    terminalreporter.section("kvbridge failure report")
    terminalreporter.write_line("| scenario | what happened | detect | recover | leaks | reproduce |")
    terminalreporter.write_line("|---|---|---|---|---|---|")
    for r in _REPORT:
        terminalreporter.write_line(f"| {r['scenario']} | {r['happened']} | {fmt(r['detect_s'])} | "
                                    f"{fmt(r['recover_s'])} | {r['leaks']} | `{r['command']}` |")

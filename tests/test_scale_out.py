"""Nodes added and drained at run time (router/node_admin.py, through `kvbridge nodes`' client,
launch/node_ctl.py), against stub backends: a drain loses no request, and the drained node gets nothing new."""
from __future__ import annotations

import asyncio
import math

import aiohttp
import pytest
from prometheus_client import REGISTRY

from launch.node_ctl import AdminError, nodes_command
from router.app import PROXY, build_app
from router.config import DecodeInstance, Instance, RouterConfig
from router.node_file import AddedNode, NodeFile
from transfer import wire
from transfer.config_errors import ConfigError
from tests.router_stubs import REQ, StubNode, eventually, events, post


async def stream(url: str) -> tuple[int, list[str]]:
    status, _, raw = await post(url, dict(REQ, stream=True))
    return status, events(raw)


async def test_draining_a_decode_node_loses_no_request_and_takes_none_after(make):
    d0 = StubNode("d0", events=20, interval=0.05, kv=True)
    d1 = StubNode("d1", events=20, interval=0.05, kv=True)
    url, api = await make([StubNode("p")], [d0, d1], policy="round_robin")
    flying = [asyncio.create_task(stream(url)) for _ in range(6)]
    assert await eventually(lambda: len(d0.bodies) == 3 and len(d1.bodies) == 3)
    drained = await asyncio.to_thread(nodes_command, url, "drain", name="d0")
    assert drained == {"name": "d0", "kind": "decode", "outstanding": 0, "removed": True}
    for status, ev in await asyncio.gather(*flying):  # every stream in flight when the drain began finished whole
        assert status == 200 and len(ev) == 21 and ev[-1] == "[DONE]"
    assert d0.aborted == 0
    after = await asyncio.gather(*(stream(url) for _ in range(4)))
    assert all(s == 200 for s, _ in after) and len(d0.bodies) == 3 and len(d1.bodies) == 7
    listed = await asyncio.to_thread(nodes_command, url, "list")
    assert [b["name"] for b in listed["decode"]] == ["d1"]


async def test_a_node_added_at_run_time_takes_requests(make):
    d0, d1 = StubNode("d0", kv=True), StubNode("d1", kv=True)
    await d1.start()
    try:
        url, api = await make([StubNode("p")], [d0], policy="round_robin")
        added = await asyncio.to_thread(nodes_command, url, "add", "decode", "d1", d1.url,
                                        f"127.0.0.1:{d1.kv_port}")
        assert added == {"name": "d1", "kind": "decode", "state": "up"}
        for _ in range(4):
            assert (await post(url, REQ))[0] == 200
        assert len(d0.bodies) == 2 and len(d1.bodies) == 2
        with pytest.raises(AdminError, match="exists already"):
            await asyncio.to_thread(nodes_command, url, "add", "decode", "d1", d1.url, f"127.0.0.1:{d1.kv_port}")
    finally:
        await d1.stop()


async def test_admin_asks_for_the_api_key_on_the_api_port(make, monkeypatch):
    monkeypatch.setenv("ROUTER_TEST_KEY", "k1")
    url, _ = await make([StubNode("p")], [StubNode("d", kv=True)], api_key_env="ROUTER_TEST_KEY")
    async with aiohttp.ClientSession() as s, s.post(url + "/admin/nodes/d/drain") as r:
        assert r.status == 401
    monkeypatch.setenv("KVBRIDGE_ROUTER_API_KEY", "k1")
    assert (await asyncio.to_thread(nodes_command, url, "drain", name="d", wait=False))["removed"] is False


async def test_request_traces_ask_for_the_api_key_on_the_api_port_and_metrics_stay_open(make, monkeypatch):
    """A trace names the nodes a request went to and why: not for whoever reaches the API port without the key."""
    monkeypatch.setenv("ROUTER_TEST_KEY", "k1")
    url, _ = await make([StubNode("p")], [StubNode("d", kv=True)], api_key_env="ROUTER_TEST_KEY")
    status, headers, _ = await post(url, REQ, headers={"Authorization": "Bearer k1"})
    trace = f"{url}/debug/requests/{headers['x-kvbridge-request-id']}"
    async with aiohttp.ClientSession() as s:
        async with s.get(trace) as r:
            assert r.status == 401
        async with s.get(trace, headers={"Authorization": "Bearer k1"}) as r:
            assert r.status == 200 and (await r.json())["events"]
        async with s.get(url + "/metrics") as r:
            assert r.status == 200


async def test_nodes_added_and_drained_at_run_time_stay_so_after_a_router_restart(make, tmp_path):
    nodes_file = tmp_path / "nodes.json"
    d0, d1 = StubNode("d0", kv=True), StubNode("d1", kv=True)
    await d1.start()
    try:
        url, _ = await make([StubNode("p")], [d0], policy="round_robin", nodes_file=str(nodes_file))
        await asyncio.to_thread(nodes_command, url, "add", "decode", "d1", d1.url, f"127.0.0.1:{d1.kv_port}")
        await asyncio.to_thread(nodes_command, url, "drain", name="d0")
        # the same config file, a new router process: d0 is configured, d1 is not
        again, api = await make([StubNode("p")], [StubNode("d0", kv=True)], policy="round_robin",
                                nodes_file=str(nodes_file))
        assert [b.name for b in api[PROXY].registry.backends["decode"]] == ["d1"]
        assert await eventually(lambda: api[PROXY].registry.backends["decode"][0].state == "up")
        assert (await post(again, REQ))[0] == 200 and len(d1.bodies) == 1
    finally:
        await d1.stop()


async def test_a_node_file_the_router_cannot_read_stops_its_start_naming_the_file(tmp_path):
    bad = tmp_path / "nodes.json"
    bad.write_text('{"version": 1, "added": [{"kind": "decode", "name": "d9"}]}')  # no url, no kv_address
    cfg = RouterConfig.model_validate({"model": "tiny", "prefill": [{"name": "p", "url": "http://127.0.0.1:1"}],
                                       "decode": [{"name": "d", "url": "http://127.0.0.1:2",
                                                   "kv_address": "127.0.0.1:3"}], "nodes_file": str(bad)})
    with pytest.raises(ConfigError, match="nodes.json: not a node file"):
        build_app(cfg)


def test_a_configured_node_added_again_is_served_with_its_new_address_and_stays_away_once_drained_again(tmp_path):
    path, names = tmp_path / "nodes.json", {"p", "d0"}
    configured = {"prefill": [Instance(name="p", url="http://127.0.0.1:1")],
                  "decode": [DecodeInstance(name="d0", url="http://127.0.0.1:2", kv_address="127.0.0.1:3")]}
    nodes = NodeFile(path, names)
    nodes.removed("d0")
    nodes.added(AddedNode(kind="decode", name="d0", url="http://127.0.0.1:4", kv_address="127.0.0.1:5"))
    served = NodeFile(path, names).apply(configured)  # a restarted router reads the file again
    assert [(i.name, i.url) for i in served["decode"]] == [("d0", "http://127.0.0.1:4")]
    nodes.removed("d0")
    assert NodeFile(path, names).apply(configured) == {"prefill": configured["prefill"], "decode": []}


def test_a_node_file_entry_of_no_known_kind_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "nodes.json"
    bad.write_text('{"version": 1, "added": [{"kind": "router", "name": "r", "url": "http://127.0.0.1:1"}]}')
    with pytest.raises(ConfigError, match="nodes.json: not a node file"):
        NodeFile(bad, set())


async def test_an_add_whose_client_leaves_during_the_first_check_still_checks_the_node_from_then_on(make):
    """The admin client gives up while the new node's /health hangs: the node is added (the file has it), and once
    it answers it is up; it does not stay down for want of a health loop."""
    d0, d1 = StubNode("d0", kv=True), StubNode("d1", kv=True)
    await d1.start()
    d1.health_hangs = True
    try:
        url, api = await make([StubNode("p")], [d0], health_timeout_s=2)
        spec = {"kind": "decode", "name": "d1", "url": d1.url, "kv_address": f"127.0.0.1:{d1.kv_port}"}
        with pytest.raises(TimeoutError):
            async with aiohttp.ClientSession() as s:
                await s.post(url + "/admin/nodes", json=spec, timeout=aiohttp.ClientTimeout(total=0.3))
        d1.health_hangs = False
        assert await eventually(lambda: [b.state for b in api[PROXY].registry.backends["decode"]] == ["up", "up"])
    finally:
        await d1.stop()


@pytest.mark.parametrize("address", ["-host:5600", ".host:5600", "host:0", "host:70000", "host:port"])
async def test_a_node_whose_kv_address_zmq_cannot_use_is_refused_with_400(make, address):
    url, api = await make([StubNode("p")], [StubNode("d0", kv=True)])
    spec = {"kind": "decode", "name": "d1", "url": "http://127.0.0.1:9", "kv_address": address}
    async with aiohttp.ClientSession() as s, s.post(url + "/admin/nodes", json=spec) as r:
        assert r.status == 400 and "kv_address" in (await r.json())["error"]["message"]
    assert [b.name for b in api[PROXY].registry.backends["decode"]] == ["d0"]


async def test_health_is_503_while_every_decode_node_drains_and_a_removed_node_leaves_no_metrics(make):
    """A load balancer must stop sending to a router whose decode nodes all drain; a drained node must not show
    as a healthy instance on /metrics for ever after."""
    d0 = StubNode("d0", events=20, interval=0.05, kv=True)
    url, _ = await make([StubNode("p")], [d0])
    flying = asyncio.create_task(post(url, dict(REQ, stream=True)))
    assert await eventually(lambda: len(d0.bodies) == 1)
    await asyncio.to_thread(nodes_command, url, "drain", name="d0", wait=False)
    async with aiohttp.ClientSession() as s, s.get(url + "/health") as r:
        assert r.status == 503
    assert (await flying)[0] == 200
    assert REGISTRY.get_sample_value("kvbridge_router_instance_healthy", {"kind": "decode", "backend": "d0"}) == 1
    await asyncio.to_thread(nodes_command, url, "drain", name="d0")
    for metric in ("kvbridge_router_instance_healthy", "kvbridge_router_instance_state", "kvbridge_router_outstanding"):
        assert REGISTRY.get_sample_value(metric, {"kind": "decode", "backend": "d0"}) is None, metric
    for metric in ("kvbridge_router_decode_pool_free", "kvbridge_router_decode_pool_resting"):
        assert REGISTRY.get_sample_value(metric, {"backend": "d0"}) is None, metric


async def test_each_decode_nodes_free_and_resting_shares_of_its_slots_are_exported(make):
    """Slots resting after unfilled leases (until no late write can land: a silent producer's may rest its TCP's
    hold, transfer/write_hold.py) are neither free nor in use: an operator sees them apart."""
    d0 = StubNode("d0", kv=True)
    d0.resting = 2
    await make([StubNode("p")], [d0])
    shares = {"backend": "d0"}
    assert await eventually(lambda: REGISTRY.get_sample_value("kvbridge_router_decode_pool_resting", shares) == 0.25)
    assert REGISTRY.get_sample_value("kvbridge_router_decode_pool_free", shares) == 0.625  # and 1 of 8 in use
    d0.stats_silent = True  # no answer: no room known, and what rests is unknown, not the last reading
    resting = lambda: REGISTRY.get_sample_value("kvbridge_router_decode_pool_resting", shares)  # noqa: E731
    assert await eventually(lambda: math.isnan(resting()))
    assert REGISTRY.get_sample_value("kvbridge_router_decode_pool_free", shares) == 0.0


async def test_a_removed_decode_node_gets_no_control_message_from_then_on(make):
    """Its channel is closed at the removal; a late question about it (a background cancel, a health check that was
    under way) must not open a new one, which would keep reconnecting to an address no node uses."""
    d0, d1 = StubNode("d0", kv=True), StubNode("d1", kv=True)
    url, api = await make([StubNode("p")], [d0, d1])
    control, gone = api[PROXY].registry.control, f"127.0.0.1:{d0.kv_port}"
    assert isinstance(await control.ask(gone, wire.Stats(rid=1), 2), wire.PoolStatus)  # its connector answers
    await asyncio.to_thread(nodes_command, url, "drain", name="d0")
    assert await control.ask(gone, wire.Stats(rid=1), 2) is None
    assert isinstance(await control.ask(f"127.0.0.1:{d1.kv_port}", wire.Stats(rid=1), 2), wire.PoolStatus)


async def test_a_drain_whose_client_leaves_still_removes_the_node_once_its_requests_are_done(make):
    d0 = StubNode("d0", events=20, interval=0.05, kv=True)
    url, api = await make([StubNode("p")], [d0, StubNode("d1", kv=True)])
    flying = asyncio.create_task(post(url, dict(REQ, stream=True)))
    assert await eventually(lambda: len(d0.bodies) == 1)
    with pytest.raises(TimeoutError):
        async with aiohttp.ClientSession() as s:
            await s.post(url + "/admin/nodes/d0/drain", timeout=aiohttp.ClientTimeout(total=0.2))
    assert (await flying)[0] == 200
    assert await eventually(lambda: [b.name for b in api[PROXY].registry.backends["decode"]] == ["d1"])

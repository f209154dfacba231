"""`kvbridge status` against a deployment's endpoints: stand-ins serve the same /health, /metrics (real
prometheus_client text) and decode `stats` replies (real wire messages) the processes serve, so every
column is read from the source it names; a node that is down shows as unreachable, not as a hang."""
from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
import yaml
import zmq
import zmq.asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from launch.status import collect
from launch.status_view import since, table
from transfer import control_auth, wire

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graph(dir: Path, ports: dict[str, int]) -> Path:
    def role(source: str, name: str, **connector: object) -> str:
        data = yaml.safe_load((ROOT / "configs" / source).read_text())
        data.update(name=name, port=ports[name])
        data.setdefault("connector", {}).update(connector)
        (dir / f"{name}.yaml").write_text(yaml.safe_dump(data))
        return f"{name}.yaml"
    router = yaml.safe_load((ROOT / "configs" / "router.yaml").read_text())
    router["port"] = ports["router"]
    (dir / "router.yaml").write_text(yaml.safe_dump(router))
    graph = {"role": "deployment", "name": "t", "router": "router.yaml", "metrics_port": ports["supervisor"],
             "prefill": [role("prefill.yaml", "prefill-0", metrics_port=ports["metrics"])],
             "decode": [role("decode.yaml", "decode-0", listen_port=ports["kv"]),
                        role("decode.yaml", "decode-1", listen_port=_port())]}
    (dir / "deployment.yaml").write_text(yaml.safe_dump(graph))
    return dir / "deployment.yaml"


def _metrics_app(fill) -> web.Application:
    reg = CollectorRegistry()
    fill(reg)
    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(reg), content_type="text/plain")
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


def _router_metrics(reg: CollectorRegistry) -> None:
    out = Gauge("kvbridge_router_outstanding", "", ["kind", "backend"], registry=reg)
    state = Gauge("kvbridge_router_instance_state", "", ["kind", "backend"], registry=reg)
    out.labels("prefill", "prefill-0").set(3)
    out.labels("decode", "decode-0").set(2)
    state.labels("prefill", "prefill-0").set(0)
    state.labels("decode", "decode-0").set(1)
    state.labels("decode", "decode-1").set(2)


def _engine_metrics(reg: CollectorRegistry) -> None:
    Gauge("kvbridge_producer_staging_free_slots", "", registry=reg).set(12)
    Gauge("kvbridge_producer_staging_slots", "", registry=reg).set(16)
    t = Counter("kvbridge_transfer_transitions_total", "", ["role", "state"], registry=reg)
    t.labels("producer", "SENT").inc(40)
    t.labels("producer", "FAILED").inc(2)
    t.labels("producer", "SENDING").inc(42)
    Gauge("kvbridge_store_used_bytes", "", ["tier"], registry=reg).labels("memory").set(3 * 2**20)
    Counter("kvbridge_store_hits_total", "", ["tier"], registry=reg).labels("memory").inc(3)
    Counter("kvbridge_store_misses_total", "", ["tier"], registry=reg).labels("memory").inc(1)


def _supervisor_metrics(reg: CollectorRegistry) -> None:
    restarts = Counter("kvbridge_supervisor_restarts_total", "", ["role"], registry=reg)
    given_up = Gauge("kvbridge_supervisor_given_up", "", ["role"], registry=reg)
    for role, n in (("router", 0), ("prefill-0", 0), ("decode-0", 2), ("decode-1", 5)):
        restarts.labels(role).inc(n)
        given_up.labels(role).set(1 if n == 5 else 0)


async def _consumer(port: int) -> None:
    sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    sock.bind(f"tcp://127.0.0.1:{port}")
    auth = control_auth.Authenticator(None)  # no deployment secret: frames unsigned, as status sends them
    try:
        while True:
            ident, raw = await sock.recv_multipart()
            req = wire.decode_request((opened := auth.open(raw)).body)
            assert isinstance(req, wire.Stats)
            await sock.send_multipart([ident, auth.seal_reply(opened, wire.encode(wire.PoolStatus(
                rid=req.rid, incarnation="x", total=64, free=60, used=4, quarantined=0, expired_total=1,
                dropped_total=0, counters={"transfers_scattered": 38, "transfers_expired": 1, "chunks_received": 99})))])
    finally:
        sock.close(0)


async def test_status_reads_every_column_from_its_source(tmp_path):
    ports = {n: _port() for n in ("router", "prefill-0", "decode-0", "decode-1", "metrics", "kv", "supervisor")}
    graph = _graph(tmp_path, ports)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "decode-0.log").write_text("a INFO x\n(EngineCore) WARNING 12-01 [vllm.py:1] Enforce eager set\n"
                                                 "2026 WARNING kvbridge.state consumer t1 -> EXPIRED\n"
                                                 "2026 WARNING kvbridge.router: decode d is now UP\n")
    runners = []
    for port, app in ((ports["router"], _metrics_app(_router_metrics)), (ports["prefill-0"], _metrics_app(lambda r: None)),
                      (ports["metrics"], _metrics_app(_engine_metrics)), (ports["decode-0"], _metrics_app(lambda r: None)),
                      (ports["supervisor"], _metrics_app(_supervisor_metrics))):
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    consumer = asyncio.create_task(_consumer(ports["kv"]))
    try:
        rows = {r["name"]: r for r in await collect(graph, tmp_path / "logs", timeout_s=1.0)}
    finally:
        consumer.cancel()
        for runner in runners:
            await runner.cleanup()
    assert rows["prefill-0"]["health"] == "ok" and rows["prefill-0"]["outstanding"] == 3
    assert rows["prefill-0"]["staging"] == "12/16"
    assert rows["prefill-0"]["transfers"] == {"SENT": 40, "FAILED": 2}
    assert rows["prefill-0"]["store"] == {"memory": {"used_bytes": 3 * 2**20, "hits": 3, "misses": 1}}
    assert rows["decode-0"]["router_view"] == "suspect" and rows["decode-0"]["slots"] == "60/64"
    assert rows["decode-0"]["transfers"] == {"SCATTERED": 38, "EXPIRED": 1}
    assert rows["decode-0"]["errors"] == ["2026 WARNING kvbridge.state consumer t1 -> EXPIRED"]
    assert rows["decode-1"]["health"] == "unreachable" and rows["decode-1"]["slots"] == "no answer"
    assert rows["decode-1"]["router_view"] == "down"
    assert [(rows[n]["restarts"], rows[n]["given_up"]) for n in ("prefill-0", "decode-0", "decode-1")] == \
        [(0, False), (2, False), (5, True)]
    text = table(list(rows.values()))
    assert "memory 3.0M 75%" in text and "! 2026 WARNING" in text and "5 given up" in text
    json.dumps(list(rows.values()))   # --json prints these as they are


def test_watch_shows_transfers_over_the_window_and_survives_a_restart():
    old = [{"name": "d", "transfers": {"SCATTERED": 10, "EXPIRED": 1}}, {"name": "p", "transfers": {"SENT": 50}}]
    new = [{"name": "d", "transfers": {"SCATTERED": 14, "EXPIRED": 1}}, {"name": "p", "transfers": {"SENT": 3}}]
    assert [r["transfers"] for r in since(old, new)] == [{"SCATTERED": 4, "EXPIRED": 0}, {"SENT": 3}]


def test_status_of_a_graph_on_hosts_that_is_not_running_says_so(tmp_path, monkeypatch):
    """The hosts' namespaces are where `kvbridge up` recorded them; a record whose namespaces are gone (the
    deployment stopped) or no record at all is an error that says which, not a table of unreachable nodes."""
    from launch.placement import RECORD, PlacementGone
    monkeypatch.setenv("KVBRIDGE_SECRET", "s" * 32)
    graph = ROOT / "configs" / "deployment-hosts.yaml"
    with pytest.raises(PlacementGone, match="is `kvbridge up` running"):
        asyncio.run(collect(graph, tmp_path))
    hosts = {h: {"namespace": f"kvb999999999-{h}", "address": "198.18.0.1"} for h in ("hostp", "hostd", "hostr")}
    for owner, says in ((1, "pid 1, running.*namespaces gone: .*kvb999999999-hostp"), (999999999, "pid 999999999, gone")):
        record = {"deployment": "local-tiny-hosts", "owner_pid": owner, "hosts": hosts}
        (tmp_path / RECORD).write_text(json.dumps(record))
        with pytest.raises(PlacementGone, match=says):
            asyncio.run(collect(graph, tmp_path))

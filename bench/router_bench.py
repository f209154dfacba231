"""Router overhead: the same load sent straight to a stub OpenAI backend and through the kvbridge router.

The stub answers at once (a decode leg as soon as its prefill leg was answered, as a real decode node answers
only once the prefill's KV is there), so what differs is the router: parsing, picking instances, the prefill
leg and the decode leg (both to the stub), and relaying the answer. Each repeat measures p50/p99 latency at
concurrency 1 and requests/s at concurrency 32, direct then through the router, back to back; the figures
printed are medians over repeats of each repeat's pair (router minus direct p50, router over direct
requests/s), so a change in what else the machine runs between repeats cancels out. The router's CPU time
per request is printed too: unlike the ratios it does not depend on how busy the rest of the machine is.

Two more servers are measured in the same repeats, each sending both legs of a request at once and relaying the
decode leg's answer, nothing else: a bare relay (`run_bare_relay`: the router's HTTP stack, aiohttp's server on
uvloop and the router's leg client), what that stack alone costs for the same three HTTP exchanges per request
(router / bare relay says what kvbridge's own work adds), and a raw relay (bench/raw_relay.py: asyncio protocols
and httptools' parser, no framework), the floor of those exchanges on this machine.

Everything shares this machine's cores: the load generator, the stub (which answers two calls per routed
request) and the router. Stub and load generator run on uvloop when it is installed, as the router does,
so that the harness takes as little of the cores as it can from either side.

    python bench/router_bench.py [--requests 2000] [--repeats 5] [--decode-dispatch with_prefill]
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import time
import uuid
from typing import Awaitable, TypeVar

import aiohttp
from aiohttp import web

from launch.local_servers import LOG_DIR, start_router
from launch.process_handle import ProcessHandle
from router.app import LEGS, READ_BUFSIZE, UPSTREAM_KEEPALIVE_S
from router.config import RouterConfig
from router.leg_bodies import decode_body, prefill_body
from router.upstream_client import UpstreamPool

T = TypeVar("T")
CONNECT_TIMEOUT_S = RouterConfig.model_fields["connect_timeout_s"].default  # the router's default
ADDED_P50_TARGET_MS, RATIO_TARGET = 1.0, 0.4  # each routed request is two upstream calls: 0.5 is the ceiling

REPLY = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "tiny",
         "choices": [{"index": 0, "text": " hello", "finish_reason": "length", "logprobs": None}],
         "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


def run_pool_stub(port: int) -> None:
    """Answers the router's pool-occupancy probe the way a decode connector does."""
    import threading

    import zmq

    from transfer import wire
    from transfer.control_auth import Authenticator

    def serve() -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.bind(f"tcp://127.0.0.1:{port}")
        auth = Authenticator(None)  # no deployment secret: unsigned frames, as the bench's router sends them
        while True:
            ident, raw = sock.recv_multipart()
            opened = auth.open(raw)
            req = wire.decode_request(opened.body)
            reply = wire.PoolStatus(rid=req.rid, incarnation="stub", total=64, free=64, used=0, quarantined=0,
                                    expired_total=0, dropped_total=0)
            sock.send_multipart([ident, auth.seal_reply(opened, wire.encode(reply))])
    threading.Thread(target=serve, daemon=True).start()


def run_loop(coro: Awaitable[T]) -> T:
    """asyncio.run on uvloop when it is installed (the router uses it too), plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def pd_legs(body: dict, stub_port: int) -> tuple[dict, dict]:
    """A request's prefill and decode legs for the stub, built as the router builds them (router/leg_bodies.py)."""
    tid = uuid.uuid4().hex
    return prefill_body(body, tid, f"127.0.0.1:{stub_port + 1}"), decode_body(body, tid)


def run_bare_relay(port: int, stub_port: int) -> None:
    """The least a PD router on the router's HTTP stack does per request: two legs of one transfer to the stub at
    once, the decode leg's answer relayed. No placement, trace, auth, metrics, admission or failure handling."""
    upstream = f"http://127.0.0.1:{stub_port}/v1/completions"

    async def completions(request: web.Request) -> web.Response:
        async def leg(leg_body: dict) -> tuple[int, bytes]:
            up = await request.app[LEGS].post(upstream, json.dumps(leg_body).encode(), {})
            try:
                return up.status, await up.read()
            finally:
                up.release()
        _, (status, raw) = await asyncio.gather(*(leg(b) for b in pd_legs(await request.json(), stub_port)))
        return web.Response(status=status, body=raw, content_type="application/json")

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def serve() -> None:
        app = web.Application()
        app[LEGS] = UpstreamPool(UPSTREAM_KEEPALIVE_S, CONNECT_TIMEOUT_S, READ_BUFSIZE)  # as the router's
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()
    run_loop(serve())


def run_stub(port: int) -> None:
    """An OpenAI backend that answers at once, except that a decode leg answers only after the prefill leg of its
    transfer did: a real decode node cannot produce a token before the KV its prefill pushes, so a stub that
    answered it first would send the router down its cancel path (the prefill leg unanswered) on every request."""
    run_pool_stub(port + 1)
    prefilled: dict[str, asyncio.Event] = {}  # transfer id -> its prefill leg was answered

    async def completions(request: web.Request) -> web.Response:
        raw = await request.read()
        if b"kv_transfer_params" in raw:  # a PD leg; requests sent straight to the stub skip the parse
            kv = json.loads(raw)["kv_transfer_params"]["kvbridge"]
            done = prefilled.setdefault(kv["transfer_id"], asyncio.Event())
            if not kv.get("receive"):
                done.set()
            else:
                await asyncio.wait_for(done.wait(), 30)
                del prefilled[kv["transfer_id"]]
        return web.json_response(REPLY)

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()
    run_loop(serve())


async def load(url: str, n: int, concurrency: int) -> tuple[list[float], float]:
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 1}
    lat: list[float] = []
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:
        todo = iter(range(n))

        async def worker() -> None:
            for _ in todo:
                t0 = time.perf_counter()
                async with s.post(url + "/v1/completions", json=body) as r:
                    await r.read()
                    assert r.status == 200, r.status
                lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return lat, n / (time.perf_counter() - t0)


def pct(xs: list[float], p: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] * 1000


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(url: str, n: int, pid: int | None = None) -> dict:
    """Latency at concurrency 1 and requests/s at 32; with `pid`, that process's CPU ms per request at 32."""
    await load(url, 200, 8)  # warm connections
    lat, _ = await load(url, n // 2, 1)
    cpu0 = cpu_s(pid) if pid else 0.0
    _, rps = await load(url, n, 32)
    out = {"p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "rps": rps}
    if pid:
        out["cpu_ms"] = (cpu_s(pid) - cpu0) * 1000 / n
    return out


def floor_servers(stub_port: int, dispatch: str) -> dict[str, tuple[ProcessHandle, str]]:
    """The relays measured beside the router, by name, with what each one is the floor of. Both send a request's
    two legs at once: beside a router told to wait for the prefill leg (after_prefill) they are no floor, so
    none is run then; the raw relay needs httptools (installed with vLLM)."""
    if dispatch == "after_prefill":
        print("floors not measured: the relays send both legs at once, the router (after_prefill) one after the other")
        return {}
    floors = {"bare relay": (ProcessHandle("router-bench-relay", [
        sys.executable, "-c", "from bench.router_bench import run_bare_relay; "
        f"run_bare_relay(18603, {stub_port})"], "http://127.0.0.1:18603/health", None, LOG_DIR),
        "the router's HTTP stack")}
    if importlib.util.find_spec("httptools") is None:
        print("raw relay not measured: httptools is not installed")
    else:
        floors["raw relay"] = (ProcessHandle("router-bench-raw-relay", [
            sys.executable, "-c", f"from bench.raw_relay import run; run(18604, {stub_port})"],
            "http://127.0.0.1:18604/health", None, LOG_DIR), "this machine's floor, no framework")
    return floors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-dispatch", choices=["auto", "with_prefill", "after_prefill"], default="auto",
                    help="the router's decode_dispatch. The stub's prefill legs answer in well under decode_lead_s, so "
                    "auto sends both legs at once, as with_prefill does; after_prefill sends the decode leg once the "
                    "prefill leg answered (two stub round trips in series)")
    args = ap.parse_args()
    stub_port, router_port = 18601, 18600
    # The stub runs this module's run_stub() in its own process, started like every other server.
    stub = ProcessHandle("router-bench-stub", [sys.executable, "-c", "from bench.router_bench import run_stub; "
                                               f"run_stub({stub_port})"],
                         f"http://127.0.0.1:{stub_port}/health", None, LOG_DIR)
    floors = floor_servers(stub_port, args.decode_dispatch)
    cfg = RouterConfig(port=router_port, model="tiny", health_interval_s=5, decode_dispatch=args.decode_dispatch,
                       prefill=[{"name": "p", "url": f"http://127.0.0.1:{stub_port}"}],
                       decode=[{"name": "d", "url": f"http://127.0.0.1:{stub_port}",
                                "kv_address": f"127.0.0.1:{stub_port + 1}"}])
    procs = [stub] + [handle for handle, _ in floors.values()]
    try:
        for p in procs:
            p.start()
            p.wait_ready(30)
        router = start_router(cfg)
        procs.append(router)
        rows: dict[str, list[dict]] = {"direct": [], "router": [], **{name: [] for name in floors}}
        for i in range(args.repeats):
            d = run_loop(measure(f"http://127.0.0.1:{stub_port}", args.requests))
            r = run_loop(measure(f"http://127.0.0.1:{router_port}", args.requests, router.proc.pid))
            rows["direct"].append(d)
            rows["router"].append(r)
            line = (f"repeat {i + 1}: direct p50 {d['p50_ms']:.3f} ms {d['rps']:.0f} req/s | router p50 "
                    f"{r['p50_ms']:.3f} ms {r['rps']:.0f} req/s, {r['cpu_ms']:.3f} CPU ms/request | adds "
                    f"{r['p50_ms'] - d['p50_ms']:.3f} ms, ratio {r['rps'] / d['rps']:.2f}")
            for name, (handle, _) in floors.items():
                f = run_loop(measure(handle.health_url.removesuffix("/health"), args.requests, handle.proc.pid))
                rows[name].append(f)
                line += (f" | {name} {f['rps']:.0f} req/s, {f['cpu_ms']:.3f} CPU ms/request, ratio "
                         f"{f['rps'] / d['rps']:.2f}")
            print(line, flush=True)
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("p50_ms", "p99_ms", "rps")}
               for k, v in rows.items()}
        for k, v in med.items():
            print(f"{k:10} p50 {v['p50_ms']:.3f} ms  p99 {v['p99_ms']:.3f} ms  {v['rps']:.0f} req/s (32 concurrent)")
        pairs = list(zip(rows["direct"], rows["router"]))
        added = statistics.median(r["p50_ms"] - d["p50_ms"] for d, r in pairs)
        added99 = statistics.median(r["p99_ms"] - d["p99_ms"] for d, r in pairs)
        ratio = statistics.median(r["rps"] / d["rps"] for d, r in pairs)
        cpu = statistics.median(r["cpu_ms"] for r in rows["router"])
        print(f"router adds p50 {added:.3f} ms (target <= {ADDED_P50_TARGET_MS} ms: "
              f"{'met' if added <= ADDED_P50_TARGET_MS else 'NOT met'}), p99 {added99:.3f} ms")
        print(f"throughput ratio router/direct {ratio:.2f} (target >= {RATIO_TARGET}: "
              f"{'met' if ratio >= RATIO_TARGET else 'NOT met'}; each routed request makes two upstream calls, "
              f"prefill leg + decode leg, so 0.5 is the ceiling)")
        print(f"router CPU {cpu:.3f} ms per request at 32 concurrent (on {os.cpu_count()} cores shared with the "
              f"stub and the load generator)")
        for name, (_, what) in floors.items():
            trio = list(zip(rows["direct"], rows[name], rows["router"]))
            print(f"{name} ({what}): ratio to direct {statistics.median(f['rps'] / d['rps'] for d, f, _ in trio):.2f}"
                  f", CPU {statistics.median(f['cpu_ms'] for _, f, _ in trio):.3f} ms per request; router / {name}: "
                  f"throughput {statistics.median(r['rps'] / f['rps'] for _, f, r in trio):.2f}, CPU "
                  f"{statistics.median(r['cpu_ms'] / f['cpu_ms'] for _, f, r in trio):.2f}")
        print("medians over repeats of each repeat's pair (a server against direct, the router against a floor)")
    finally:
        for p in procs:
            p.stop()


if __name__ == "__main__":
    main()

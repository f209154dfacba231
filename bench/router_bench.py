"""Router overhead: the same load sent straight to a stub OpenAI backend and through the kvbridge router.

The stub answers at once, so what differs is the router: parsing, picking instances, the prefill leg
and the decode leg (both to the stub), and relaying the answer. Prints p50/p99 latency at concurrency 1
and requests/s at concurrency 32, each measured in the same run, median of repeats.

    python bench/router_bench.py [--requests 2000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import aiohttp
from aiohttp import web

from launch.local_servers import LOG_DIR, start_router
from launch.process_handle import ProcessHandle
from router.config import RouterConfig

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


def run_stub(port: int) -> None:
    run_pool_stub(port + 1)
    async def completions(_: web.Request) -> web.Response:
        return web.json_response(REPLY)

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


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


async def measure(url: str, n: int) -> dict:
    await load(url, 200, 8)  # warm connections
    lat, _ = await load(url, n // 2, 1)
    _, rps = await load(url, n, 32)
    return {"p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "rps": rps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    stub_port, router_port = 18601, 18600
    # The stub runs this module's run_stub() in its own process, started like every other server.
    stub = ProcessHandle("router-bench-stub", [sys.executable, "-c", "from bench.router_bench import run_stub; "
                                               f"run_stub({stub_port})"],
                         f"http://127.0.0.1:{stub_port}/health", None, LOG_DIR)
    cfg = RouterConfig(port=router_port, model="tiny", health_interval_s=5,
                       prefill=[{"name": "p", "url": f"http://127.0.0.1:{stub_port}"}],
                       decode=[{"name": "d", "url": f"http://127.0.0.1:{stub_port}",
                                "kv_address": f"127.0.0.1:{stub_port + 1}"}])
    procs = [stub]
    try:
        stub.start()
        stub.wait_ready(30)
        procs.append(start_router(cfg))
        rows = {"direct": [], "router": []}
        for _ in range(args.repeats):
            rows["direct"].append(asyncio.run(measure(f"http://127.0.0.1:{stub_port}", args.requests)))
            rows["router"].append(asyncio.run(measure(f"http://127.0.0.1:{router_port}", args.requests)))
        med = {k: {m: statistics.median(r[m] for r in v) for m in ("p50_ms", "p99_ms", "rps")}
               for k, v in rows.items()}
        for k, v in med.items():
            print(f"{k:7} p50 {v['p50_ms']:.3f} ms  p99 {v['p99_ms']:.3f} ms  {v['rps']:.0f} req/s (32 concurrent)")
        print(f"router adds p50 {med['router']['p50_ms'] - med['direct']['p50_ms']:.3f} ms, "
              f"p99 {med['router']['p99_ms'] - med['direct']['p99_ms']:.3f} ms; "
              f"throughput ratio router/direct {med['router']['rps'] / med['direct']['rps']:.2f} "
              f"(each routed request makes two upstream calls: prefill leg + decode leg)")
    finally:
        for p in procs:
            p.stop()


if __name__ == "__main__":
    main()

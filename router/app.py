"""The router's aiohttp application: OpenAI endpoints, health, metrics and request traces.

    python -m router.app --config configs/router.yaml
"""
from __future__ import annotations

import argparse
import logging
import time

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.config import ConfigError, RouterConfig, load_router_config
from router.metrics import LATENCY, REQUESTS
from router.openai_errors import APIError, parse_request
from router.pool_probe import transfer_trace
from router.proxy import Proxy
from router.registry import Registry

log = logging.getLogger("kvbridge.router")
MAX_BODY = 32 << 20


def build_app(cfg: RouterConfig) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    registry = Registry(cfg)

    async def on_startup(app: web.Application) -> None:
        conn = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        app["session"] = aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(
            total=cfg.request_timeout_s, sock_connect=5))
        await registry.start(app["session"])
        app["proxy"] = Proxy(cfg, registry, app["session"])

    async def on_cleanup(app: web.Application) -> None:
        await registry.stop()
        await app["session"].close()

    def openai_endpoint(path: str, kind: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            t0 = time.perf_counter()
            status = 500
            try:
                body = parse_request(await request.read(), kind, cfg.model, cfg.max_tokens_limit)
                resp = await app["proxy"].handle(request, path, body)
                status = resp.status
                return resp
            except APIError as e:
                status = e.status
                return e.response()
            except web.HTTPRequestEntityTooLarge:
                status = 413
                return APIError(413, f"request body exceeds {MAX_BODY} bytes").response()
            except (aiohttp.ClientError, TimeoutError) as e:
                status = 502
                log.warning("upstream error on %s: %s", path, e)
                return APIError(502, f"upstream error: {type(e).__name__}", "upstream_error").response()
            finally:
                REQUESTS.labels(path, str(status)).inc()
                LATENCY.labels(path).observe(time.perf_counter() - t0)
        return handler

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": cfg.model, "object": "model", "created": 0, "owned_by": "kvbridge"}]})

    async def health(_: web.Request) -> web.Response:
        snap = registry.snapshot()
        ok = any(b["healthy"] for b in snap["decode"])
        return web.json_response({"status": "ok" if ok else "degraded", "instances": snap}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def trace(request: web.Request) -> web.Response:
        t = app["proxy"].traces.get(request.match_info["rid"])
        if t is None:
            return APIError(404, "no such request in the trace history", code="not_found").response()
        out = {"id": t["id"], "path": t["path"],
               "events": [{"phase": p, "detail": d, "ms": ms} for p, d, ms in t["events"]]}
        if "transfer" in t:  # the decode connector's own phases (EXPECTED, RECEIVING, RECEIVED, SCATTERED...)
            address, tid = t["transfer"]
            out["transfer_id"] = tid
            out["decode_connector"] = await transfer_trace(address, tid, cfg.health_timeout_s, cfg.kv_secret)
        return web.json_response(out)

    app.router.add_post("/v1/completions", openai_endpoint("/v1/completions", "completions"))
    app.router.add_post("/v1/chat/completions", openai_endpoint("/v1/chat/completions", "chat"))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/debug/requests/{rid}", trace)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="kvbridge OpenAI-compatible PD router")
    ap.add_argument("--config", required=True)
    ap.add_argument("--port", type=int, help="override the config's port")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_router_config(args.config)
    except ConfigError as e:
        raise SystemExit(str(e))
    if args.port:
        cfg = cfg.model_copy(update={"port": args.port})
    log.info("router on %s:%d serving %s: prefill %s, decode %s", cfg.host, cfg.port, cfg.model,
             [i.name for i in cfg.prefill], [i.name for i in cfg.decode])
    try:
        import uvloop  # a faster event loop when installed (vLLM installs it); plain asyncio otherwise
        uvloop.install()
    except ImportError:
        pass
    web.run_app(build_app(cfg), host=cfg.host, port=cfg.port, access_log=None, handler_cancellation=True,
                print=None)


if __name__ == "__main__":
    main()

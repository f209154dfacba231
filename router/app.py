"""The router's aiohttp applications: the OpenAI API (with /health) and the admin side (/metrics,
/debug/requests), served on one address or, with `admin_port`, on two.

    python -m router.app --config configs/router.yaml
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from typing import Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.auth import access_middleware, load_secret
from router.config import ConfigError, RouterConfig, load_router_config
from router.metrics import LATENCY, REQUESTS, child
from router.models_proxy import backend_models
from router.node_admin import add_node_admin_routes
from router.openai_errors import TOO_DEEP, APIError, parse_request
from router.pool_probe import transfer_trace
from router.proxy import Proxy
from router.registry import Registry
from router.upstream_client import UpstreamPool

log = logging.getLogger("kvbridge.router")
MAX_BODY = 32 << 20
READ_BUFSIZE = 1 << 20  # what a leg's answer buffers while unread (router/upstream_client.py)
# vLLM's HTTP server closes a connection idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE). A pooled connection kept
# longer is reused just as the server closes it, and the request fails before a byte was sent, counted against a
# healthy decode node: under load two such failures in a row turned a retried request into a 502 and three marked
# the node down. So the router lets go of them first.
UPSTREAM_KEEPALIVE_S = 2.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SESSION = web.AppKey("session", aiohttp.ClientSession)
PROXY = web.AppKey("proxy", Proxy)
LEGS = web.AppKey("legs", UpstreamPool)


def add_admin_routes(app: web.Application, api: web.Application, cfg: RouterConfig) -> None:
    """/metrics, /debug/requests/{id} and /admin (router/node_admin.py), reading the API app's proxy. Who may
    call them: router/auth.py's access_middleware (on either port)."""
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def trace(request: web.Request) -> web.Response:
        t = api[PROXY].traces.get(request.match_info["rid"])
        if t is None:
            return APIError(404, "no such request in the trace history", code="not_found").response()
        out = {"id": t.id, "path": t.path, "events": [{"phase": p, "detail": d, "ms": ms} for p, d, ms in t.events],
               "placement": [d.explain() for d in t.placement]}
        if t.transfer:  # the decode connector's own phases (EXPECTED, RECEIVING, RECEIVED, SCATTERED...)
            address, tid = t.transfer
            out["transfer_id"] = tid
            out["decode_connector"] = await transfer_trace(api[PROXY].registry.control, address, tid,
                                                           cfg.health_timeout_s)
        return web.json_response(out)

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/debug/requests/{rid}", trace)
    add_node_admin_routes(app, lambda: api[PROXY])


def build_app(cfg: RouterConfig) -> web.Application:
    """The API application. Raises ConfigError when a configured key cannot be read."""
    client_key = load_secret(cfg.api_key_env, cfg.api_key_file, "router api key")
    backend_key = load_secret(cfg.backend_api_key_env, cfg.backend_api_key_file, "backend api key")
    if cfg.push_key is None:  # reads the deployment secret now: an unreadable secret file stops the start
        log.warning("no deployment secret (%s or kv_secret_file): control messages and push targets are unsigned; "
                    "decode and prefill nodes must then run without one too, on loopback", cfg.kv_secret_env)
    access = access_middleware(client_key, cfg.host)
    app = web.Application(client_max_size=MAX_BODY, middlewares=[access] if access else [])
    registry = Registry(cfg)

    async def on_startup(app: web.Application) -> None:
        conn = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=UPSTREAM_KEEPALIVE_S)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s)
        # No cookie jar: one session carries every client's requests, and a cookie a backend set on one answer
        # would ride on the next request to that host, any port, whoever sent it.
        app[SESSION] = aiohttp.ClientSession(connector=conn, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar())
        await registry.start(app[SESSION])
        # the legs' own client (router/upstream_client.py), with the session's keep-alive and connect timeout
        app[LEGS] = UpstreamPool(UPSTREAM_KEEPALIVE_S, cfg.connect_timeout_s, READ_BUFSIZE)
        app[PROXY] = Proxy(cfg, registry, app[LEGS], backend_key)

    async def on_cleanup(app: web.Application) -> None:
        await registry.stop()
        await app[PROXY].background.cancel_all()  # before the legs close: router/background.py
        app[LEGS].close()
        await app[SESSION].close()

    def openai_endpoint(path: str, kind: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            t0 = time.perf_counter()
            status = 500
            try:
                body = parse_request(await request.read(), kind, cfg.model, cfg.max_tokens_limit)
                resp = await app[PROXY].handle(request, path, body)
                status = resp.status
                return resp
            except APIError as e:
                status = e.status
                return e.response()
            except web.HTTPRequestEntityTooLarge:
                status = 413
                return APIError(413, f"request body exceeds {MAX_BODY} bytes").response()
            except RecursionError:  # parsed, but too deep to walk or serialise for a leg
                status = 400
                return APIError(400, TOO_DEEP).response()
            except asyncio.CancelledError:  # the client left (or the router stops) mid-request: nginx's 499, not 500
                status = 499
                raise
            finally:
                child(REQUESTS, path, str(status)).inc()
                child(LATENCY, path).observe(time.perf_counter() - t0)
        return handler

    async def models(request: web.Request) -> web.Response:
        try:
            return await backend_models(request, registry, app[SESSION], backend_key, cfg.health_timeout_s * 5)
        except APIError as e:
            return e.response()

    async def health(_: web.Request) -> web.Response:
        snap = registry.snapshot()
        ok = any(b["healthy"] and not b["draining"] for b in snap["decode"])
        return web.json_response({"status": "ok" if ok else "degraded", "instances": snap}, status=200 if ok else 503)

    app.router.add_post("/v1/completions", openai_endpoint("/v1/completions", "completions"))
    app.router.add_post("/v1/chat/completions", openai_endpoint("/v1/chat/completions", "chat"))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    if cfg.admin_port is None:
        add_admin_routes(app, app, cfg)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def build_admin_app(api: web.Application, cfg: RouterConfig) -> web.Application:
    access = access_middleware(load_secret(cfg.api_key_env, cfg.api_key_file, "router api key"), cfg.admin_host)
    admin = web.Application(middlewares=[access] if access else [])
    add_admin_routes(admin, api, cfg)
    return admin


async def serve(cfg: RouterConfig) -> None:
    """Both applications until SIGTERM or SIGINT, then a clean shutdown (connections closed, probes stopped)."""
    api = build_app(cfg)
    runners = [web.AppRunner(api, access_log=None, handler_cancellation=True)]
    sites = [(runners[0], cfg.host, cfg.port)]
    if cfg.admin_port is not None:
        runners.append(web.AppRunner(build_admin_app(api, cfg), access_log=None))
        sites.append((runners[1], cfg.admin_host, cfg.admin_port))
    try:
        for r in runners:
            await r.setup()
        for r, host, port in sites:
            await web.TCPSite(r, host, port).start()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        for r in reversed(runners):
            await r.cleanup()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="kvbridge OpenAI-compatible PD router")
    ap.add_argument("--config", required=True)
    ap.add_argument("--port", type=int, help="override the config's port")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_router_config(args.config)
        if args.port:
            cfg = cfg.model_copy(update={"port": args.port})
        log.info("router on %s:%d serving %s: prefill %s, decode %s%s", cfg.host, cfg.port, cfg.model,
                 [i.name for i in cfg.prefill], [i.name for i in cfg.decode],
                 f"; /metrics and /debug on {cfg.admin_host}:{cfg.admin_port}" if cfg.admin_port else "")
        try:
            import uvloop  # a faster event loop when installed (vLLM installs it); plain asyncio otherwise
            uvloop.install()
        except ImportError:
            pass
        asyncio.run(serve(cfg))
    except ConfigError as e:
        raise SystemExit(str(e))


if __name__ == "__main__":
    main()


"""Nodes added and drained at run time, and the placement mode pinned, on the router's admin side.

    GET  /admin/nodes                      every node, its state, load and whether it drains
    POST /admin/nodes                      {"kind": "prefill"|"decode", "name", "url"[, "kv_address"]}: add one
    POST /admin/nodes/{name}/drain         no new request goes there; those in flight finish; answers once
                                           none is left and the node is removed (which goes on if the client
                                           leaves); ?wait=0: answers at once and the node stays, draining
    GET  /admin/placement, /debug/placement   mode, learned rates, break-even tokens, the prefix index's size
    POST /admin/placement                  {"mode": "auto"|"always"|"never"}

With `nodes_file` set, nodes added here and configured nodes drained away stay so across a router restart
(router/node_file.py); without it a restarted router serves its config file's nodes. Either way it learns
again from their replies what they hold (router/prefix_index.py).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from aiohttp import web
from pydantic import ValidationError

from router.node_file import AddedNode
from router.openai_errors import APIError
from router.proxy import Proxy
from router.registry import Backend

log = logging.getLogger("kvbridge.router")
DRAIN_POLL_S = 0.05


def find(proxy: Proxy, name: str) -> Backend:
    for backends in proxy.registry.backends.values():
        for b in backends:
            if b.name == name:
                return b
    raise APIError(404, f"no node named {name!r}", code="not_found")


async def add_node(proxy: Proxy, spec: dict) -> Backend:
    """Add a node from its instance spec; it takes requests once its first health check passes."""
    kind = spec.get("kind")
    if kind not in ("prefill", "decode"):
        raise APIError(400, "kind must be 'prefill' or 'decode'", param="kind")
    try:
        node = AddedNode.model_validate(spec)
        inst = node.instance()
    except ValidationError as e:
        raise APIError(400, f"bad node spec: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
    if any(b.name == inst.name for bs in proxy.registry.backends.values() for b in bs):
        raise APIError(409, f"a node named {inst.name!r} exists already", code="conflict")
    try:
        proxy.registry.node_file.added(node)  # first: a node the file cannot keep is not added
    except OSError as e:
        raise APIError(500, f"could not record the node in {proxy.registry.node_file.path}: {e}", "server_error",
                       code="nodes_file") from None
    b = Backend(inst, kind)
    log.info("%s %s added at %s", kind, inst.name, inst.url)
    await proxy.registry.add(b)
    return b


async def drain(proxy: Proxy, name: str, wait: bool) -> dict:
    """Stop sending `name` new requests; with `wait`, return once its in-flight ones are done and it is removed.
    The removal goes on if the admin client leaves meanwhile (every waiting drain of a node shares it)."""
    b = find(proxy, name)
    if not b.draining:
        b.draining = True
        log.info("%s %s draining (%d in flight)", b.kind, b.name, b.outstanding)
    if wait:
        if b.removal is None or (b.removal.done() and (b.removal.cancelled() or b.removal.exception())):  # retried
            b.removal = asyncio.create_task(_remove_when_idle(proxy, b))
        await asyncio.shield(b.removal)
    return {"name": b.name, "kind": b.kind, "outstanding": b.outstanding,
            "removed": b not in proxy.registry.backends[b.kind]}


async def _remove_when_idle(proxy: Proxy, b: Backend) -> None:
    while b.outstanding > 0:
        await asyncio.sleep(DRAIN_POLL_S)
    if b in proxy.registry.backends[b.kind]:
        proxy.registry.remove(b)
        proxy.placement.index.forget(b.name)
        try:
            proxy.registry.node_file.removed(b.name)
        except OSError as e:
            log.error("%s %s removed, but not from %s (%s): a restarted router will serve it again",
                      b.kind, b.name, proxy.registry.node_file.path, e)
        log.info("%s %s drained and removed", b.kind, b.name)


def add_node_admin_routes(app: web.Application, proxy: Callable[[], Proxy]) -> None:
    """`proxy()` returns the API app's Proxy (it exists only once the API app started)."""
    async def nodes(_: web.Request) -> web.Response:
        return web.json_response(proxy().registry.snapshot())

    async def add(request: web.Request) -> web.Response:
        try:
            b = await add_node(proxy(), await _json(request))
            return web.json_response({"name": b.name, "kind": b.kind, "state": b.state}, status=201)
        except APIError as e:
            return e.response()

    async def drain_one(request: web.Request) -> web.Response:
        try:
            wait = request.query.get("wait", "1") not in ("0", "false")
            return web.json_response(await drain(proxy(), request.match_info["name"], wait))
        except APIError as e:
            return e.response()

    async def placement(_: web.Request) -> web.Response:
        return web.json_response(proxy().placement.snapshot())

    async def set_mode(request: web.Request) -> web.Response:
        try:
            mode = (await _json(request)).get("mode")
            if mode not in ("auto", "always", "never"):
                raise APIError(400, "mode must be 'auto', 'always' or 'never'", param="mode")
            proxy().placement.set_mode(mode)
            log.info("placement mode pinned to %s", mode)
            return web.json_response(proxy().placement.snapshot())
        except APIError as e:
            return e.response()

    app.router.add_get("/admin/nodes", nodes)
    app.router.add_post("/admin/nodes", add)
    app.router.add_post("/admin/nodes/{name}/drain", drain_one)
    app.router.add_get("/admin/placement", placement)
    app.router.add_get("/debug/placement", placement)
    app.router.add_post("/admin/placement", set_mode)


async def _json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise APIError(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body

"""/v1/models as the backends say it: `root` (the weights path tools read a tokenizer from),
`max_model_len` and `permission` come from vLLM, so clients such as `vllm bench serve` work against
the router as they would against vLLM."""
from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from router.auth import upstream_headers
from router.openai_errors import APIError
from router.registry import Registry


async def backend_models(request: web.Request, registry: Registry, session: aiohttp.ClientSession,
                         backend_key: str | None, timeout_s: float) -> web.Response:
    """The first live backend's /v1/models answer (decode instances first, they answer the clients)."""
    headers = upstream_headers(request.headers, backend_key)
    live = [b for kind in ("decode", "prefill") for b in registry.backends[kind] if b.state != "down"]
    for b in live:
        try:
            async with session.get(b.inst.url + "/v1/models", headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                if r.status in (401, 403):
                    return web.Response(body=await r.read(), status=r.status, content_type="application/json")
                if r.status == 200:
                    return web.json_response(await r.json())
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            continue
    raise APIError(503, "no backend answered /v1/models", "service_unavailable", code="no_backend")

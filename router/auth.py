"""API keys and the headers that travel to both legs.

The router's own key (clients must present it) and the backends' key (vLLM's --api-key) come from an
environment variable or a file, never from argv or the YAML itself, and are never logged. Without a
backend key the client's own `Authorization` passes through, so a router in front of key-protected
backends works without learning the key.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path
from typing import Awaitable, Callable

from aiohttp import web
from multidict import CIMultiDictProxy

from router.openai_errors import APIError
from transfer.config_errors import ConfigError
from transfer.credentials import is_loopback

ADMIN_PATHS = ("/admin/", "/debug/")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Request headers that follow the request to both legs (tracing and request ids, and auth unless overridden).
PASS_THROUGH = ("authorization", "x-request-id", "traceparent", "tracestate")


def load_secret(env: str | None, file: Path | None, what: str) -> str | None:
    """The secret named by `env` or stored in `file` (stripped), or None when neither is configured."""
    if env:
        value = os.environ.get(env)
        if not value:
            raise ConfigError(f"{what}: environment variable {env} is not set or empty")
        return value
    if file:
        try:
            value = Path(file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{what}: cannot read {file}: {e.strerror}") from None
        if not value:
            raise ConfigError(f"{what}: {file} is empty")
        return value
    return None


def bearer_matches(headers: CIMultiDictProxy[str], key: str) -> bool:
    """Constant-time check of `Authorization: Bearer <key>`. A header that is not UTF-8 (aiohttp keeps its bytes as
    surrogates) is compared as its bytes: it cannot match, and it must not raise."""
    got = headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(errors="surrogateescape"),
                                                              key.encode())


def upstream_headers(client_headers: CIMultiDictProxy[str], backend_key: str | None) -> dict[str, str]:
    """Headers for both legs: the pass-through set, with the backends' own key when one is configured."""
    out = {h: client_headers[h] for h in PASS_THROUGH if h in client_headers}
    if backend_key:
        out["authorization"] = f"Bearer {backend_key}"
    return out


def access_middleware(key: str | None, bind_host: str) -> Callable | None:
    """Who may call what on an app listening on `bind_host` (None: anyone may, nothing to check). With a client
    key, /v1, /admin and /debug ask for it. Without one, /admin and /debug answer clients on this host only:
    /admin can add a decode node, to which prefill nodes would then push prompts' KV, so a router listening on a
    routable address must not be re-pointed by whoever reaches it. /health and /metrics stay open (probes,
    scrapers)."""
    if key is None and is_loopback(bind_host, resolve=False):
        return None  # every client is on this host

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        admin = request.path.startswith(ADMIN_PATHS)
        if key is not None:
            if (admin or request.path.startswith("/v1/")) and not bearer_matches(request.headers, key):
                return APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                                code="invalid_api_key").response()
        elif admin and not _on_this_host(request):
            return APIError(403, f"/{request.path.split('/')[1]} answers clients on the router's host only while the "
                            "router has no API key: set api_key_env or api_key_file to manage it from elsewhere",
                            code="forbidden").response()
        return await handler(request)
    return check


def _on_this_host(request: web.Request) -> bool:
    """A loopback client (IPv4-mapped too, as a dual-stack listener reports it), or one that connected from the
    address it reached the router at: a client on the router's host using its routable address (a multi-host
    graph's demo does, from the router's own network namespace)."""
    peer = request.remote or ""
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback):
        return True
    local = request.transport.get_extra_info("sockname") if request.transport is not None else None
    return bool(local) and local[0] == peer

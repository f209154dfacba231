"""Who may call what on the router (router/auth.py's access_middleware): /admin can add a decode node, to which
prefill nodes would then push prompts' KV, so without an API key it answers clients on the router's host only."""
from __future__ import annotations

from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from router.auth import access_middleware


def from_peer(method: str, path: str, peer: str, key: str | None = None, local: str = "10.9.9.9") -> web.Request:
    """A request from `peer` that reached the router at its address `local`."""
    transport = mock.Mock()
    extra = {"peername": (peer, 40000), "sockname": (local, 8000)}
    transport.get_extra_info.side_effect = lambda name, default=None: extra.get(name, default)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return make_mocked_request(method, path, headers=headers, transport=transport)


async def answered(request: web.Request) -> web.Response:
    return web.Response(text="answered")


async def status(middleware, request: web.Request) -> int:
    return (await middleware(request, answered)).status


@pytest.mark.parametrize("path", ["/admin/nodes", "/admin/nodes/d0/drain", "/debug/requests/r1", "/debug/placement"])
async def test_without_a_key_admin_and_debug_answer_only_clients_on_the_routers_host(path):
    access = access_middleware(None, "0.0.0.0")
    assert await status(access, from_peer("POST", path, "10.1.2.3")) == 403
    assert await status(access, from_peer("POST", path, "127.0.0.1")) == 200
    assert await status(access, from_peer("POST", path, "::1")) == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/health", "/metrics"])
async def test_without_a_key_the_api_probes_and_scrapes_stay_open_to_everyone(path):
    assert await status(access_middleware(None, "0.0.0.0"), from_peer("GET", path, "10.1.2.3")) == 200


async def test_with_a_key_every_client_that_sends_it_may_manage_the_router_and_no_other():
    access = access_middleware("k1", "0.0.0.0")
    for path in ("/admin/nodes", "/debug/requests/r1", "/v1/completions"):
        assert await status(access, from_peer("POST", path, "10.1.2.3", key="k1")) == 200
        assert await status(access, from_peer("POST", path, "127.0.0.1")) == 401
        assert await status(access, from_peer("POST", path, "10.1.2.3", key="k2")) == 401
    assert await status(access, from_peer("GET", "/metrics", "10.1.2.3")) == 200


async def test_a_router_on_loopback_without_a_key_checks_nothing():
    """Every client of a loopback listener is on its host: no middleware, nothing added to each request."""
    assert access_middleware(None, "127.0.0.1") is None and access_middleware(None, "localhost") is None
    assert access_middleware("k1", "127.0.0.1") is not None


async def test_the_refusal_says_how_to_manage_the_router_from_elsewhere():
    r = await access_middleware(None, "0.0.0.0")(from_peer("POST", "/admin/nodes", "10.1.2.3"), answered)
    assert "api_key_env" in r.text and "/admin" in r.text


async def test_without_a_key_a_client_on_the_routers_host_may_use_its_routable_address():
    """The peer's address is the router's own (a multi-host graph's demo runs in the router's namespace), or a
    dual-stack listener reports a loopback client IPv4-mapped."""
    access = access_middleware(None, "0.0.0.0")
    assert await status(access, from_peer("GET", "/debug/requests/r1", "198.18.0.3", local="198.18.0.3")) == 200
    assert await status(access, from_peer("GET", "/debug/requests/r1", "::ffff:127.0.0.1", local="::")) == 200
    assert await status(access, from_peer("GET", "/debug/requests/r1", "198.18.0.4", local="198.18.0.3")) == 403

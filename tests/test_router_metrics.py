"""What the router counts and holds for a client (stub backends): a client that leaves is no server error, time to
first token is measured to the first token, not to the end of the answer, and a client that stops reading is let
go of."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from prometheus_client import REGISTRY

from router.app import PROXY
from tests.router_stubs import REQ, StubNode, eventually, post, states

PATH = "/v1/completions"


def requests_counted(status: str) -> float:
    return REGISTRY.get_sample_value("kvbridge_router_requests_total", {"endpoint": PATH, "status": status}) or 0


def histogram(name: str) -> tuple[float, float]:
    """(count, sum) of a router histogram for PATH."""
    return (REGISTRY.get_sample_value(f"{name}_count", {"endpoint": PATH}) or 0,
            REGISTRY.get_sample_value(f"{name}_sum", {"endpoint": PATH}) or 0)


async def test_a_client_that_leaves_before_its_answer_is_counted_499_not_500(make):
    url, api = await make([StubNode("p")], [StubNode("d", mode="late", kv=True)])
    gone, failed = requests_counted("499"), requests_counted("500")
    with pytest.raises(TimeoutError):
        async with aiohttp.ClientSession() as s:
            await s.post(url + PATH, json=REQ, timeout=aiohttp.ClientTimeout(total=0.5))
    assert await eventually(lambda: requests_counted("499") == gone + 1)
    assert requests_counted("500") == failed and states(api) == ["up"]


async def test_ttft_of_a_stream_is_its_first_event_not_its_end(make):
    """Ten events 0.2 s apart: the first goes out at once, the answer ends after 2 s."""
    url, _ = await make([StubNode("p")], [StubNode("d", events=10, interval=0.2, kv=True)])
    (n0, ttft0), (_, whole0) = histogram("kvbridge_router_ttft_seconds"), histogram("kvbridge_router_request_seconds")
    status, _, _ = await post(url, dict(REQ, stream=True))
    (n1, ttft1), (_, whole1) = histogram("kvbridge_router_ttft_seconds"), histogram("kvbridge_router_request_seconds")
    assert status == 200 and n1 == n0 + 1
    assert whole1 - whole0 > 1.9 and ttft1 - ttft0 < 1.0, (ttft1 - ttft0, whole1 - whole0)


async def test_a_client_that_stops_reading_a_stream_is_let_go_after_client_write_timeout_s(make):
    """It keeps its connection open and reads nothing: once the buffers are full the router waits 1 s, then
    cancels the decode leg and frees what the request held."""
    dec = StubNode("d", events=4000, pad=16384, kv=True)  # 64 MiB: far more than the sockets buffer
    url, api = await make([StubNode("p")], [dec], client_write_timeout_s=1.0)
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps(dict(REQ, stream=True)).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    try:
        assert await eventually(lambda: dec.aborted == 1)
        backends = api[PROXY].registry.backends
        assert await eventually(lambda: [b.outstanding for kind in backends.values() for b in kind] == [0, 0])
        assert states(api) == ["up"]
    finally:
        writer.close()


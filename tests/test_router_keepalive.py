"""The router's upstream connections: let go of when idle before vLLM's HTTP server closes them (a connection reused
just as the server closes it fails the request before a byte was sent, and counts against a healthy node), and
reused from one request's legs to the next's, streamed or not."""
from __future__ import annotations

import asyncio

import pytest
import vllm.envs

from router.app import UPSTREAM_KEEPALIVE_S
from tests.router_stubs import REQ, StubNode, events, post


def test_idle_upstream_connections_are_dropped_before_vllm_drops_them():
    assert 0 < UPSTREAM_KEEPALIVE_S < vllm.envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE


@pytest.mark.parametrize("stream", [False, True])
async def test_requests_one_after_another_reuse_one_connection_to_each_node(make, stream):
    pre, dec = StubNode("p"), StubNode("d", kv=True, end_after_done=0.05)  # the stream's end trails its [DONE]
    url, _ = await make([pre], [dec])
    for _ in range(4):
        status, _, raw = await post(url, dict(REQ, stream=stream))
        assert status == 200 and (events(raw)[-1] == "[DONE]" if stream else b'"text": "d"' in raw)
        await asyncio.sleep(0.1)  # past the stream's end
    assert len(pre.peers) == len(dec.peers) == 4
    assert len(set(pre.peers)) == len(set(dec.peers)) == 1

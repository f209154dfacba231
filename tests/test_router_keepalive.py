"""The router lets go of an idle upstream connection before vLLM's HTTP server closes it: a connection reused
just as the server closes it fails the request before a byte was sent, and counts against a healthy node."""
from __future__ import annotations

import vllm.envs

from router.app import UPSTREAM_KEEPALIVE_S


def test_idle_upstream_connections_are_dropped_before_vllm_drops_them():
    assert 0 < UPSTREAM_KEEPALIVE_S < vllm.envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE

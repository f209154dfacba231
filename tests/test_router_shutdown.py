"""A router shutting down ends what still runs in the background as given up, not as its nodes' failures: a
prefill leg left to answer on its own (its decode node scattered the KV before the leg's reply) is cancelled
before the legs' connections close, so no healthy node is logged or counted as failed."""
from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from router.app import PROXY, build_app
from router.config import RouterConfig
from tests.router_stubs import REQ, StubNode, eventually, post


async def test_a_prefill_leg_still_running_at_shutdown_is_not_its_nodes_failure(caplog):
    p = StubNode("p", interval=3.0)  # its 1-token answer comes 3 s after the request
    d = StubNode("d", kv=True, scattered=True)  # answers at once; its connector says the KV was scattered
    stubs = [p, d]
    for s in stubs:
        await s.start()
    runner = None
    try:
        cfg = RouterConfig.model_validate({"model": "tiny", "health_interval_s": 0.2, "decode_dispatch": "with_prefill",
                                           "prefill": [p.instance()], "decode": [d.instance()]})
        api = build_app(cfg)
        runner = web.AppRunner(api, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        status, _, raw = await post(f"http://127.0.0.1:{runner.addresses[0][1]}", REQ)
        assert status == 200 and json.loads(raw)["choices"][0]["text"] == "d"
        prefill_node = api[PROXY].registry.backends["prefill"][0]
        assert await eventually(lambda: len(p.bodies) == 1) and not p.aborted  # the leg runs on
        caplog.set_level(logging.WARNING, logger="kvbridge.router")
        await runner.cleanup()
        runner = None
        assert await eventually(lambda: p.aborted == 1)  # its connection closed: the node drops the request
        await asyncio.sleep(0.1)
        assert prefill_node.request_fails == 0 and prefill_node.state == "up"
        assert not [r for r in caplog.records if "prefill leg" in r.getMessage()], caplog.text
    finally:
        if runner is not None:
            await runner.cleanup()
        for s in stubs:
            await s.stop()

"""A prefill node's first contact with a decode node, through the shared real vLLM nodes (tests/conftest.py), the test
playing the router: told that the prefill answered, the decode connector gives a producer it has not heard from
`no_show_s` (0.5 s here) to show up, unless the router named a prefill node new to it: that producer's first ALLOC
may wait behind its first handshake, so it gets `handshake_grace_s` (4 s). Its KV, pushed a second after the notice,
is then scattered; without the name the request had given up and recomputed (transfer/answered_notices.py).
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time
import uuid

import pytest

from launch.polling import wait_for
from launch.tiny_prompts import random_token_prompt
from tests.pd_client import pd_request, post, text_of, wait_producer_idle
from transfer import wire
from transfer.control_request import ask

pytestmark = pytest.mark.usefixtures("decode_pool_full_after")
LATE_S = 1.0  # the producer's first word comes this long after the notice: past no_show_s, within the grace


def trace(servers, tid: str) -> wire.TransferTrace:
    return asyncio.run(ask(servers["decode"].handshake, wire.TraceQuery(rid=1, transfer_id=tid), 5.0))


@pytest.mark.parametrize("named", [True, False], ids=["new prefill node named", "no name"])
def test_a_producer_late_on_its_first_contact_still_delivers(servers, named):
    # the nodes' own first handshake done (this file alone): the late push below is late by LATE_S only
    assert pd_request(servers, "/v1/completions", {"model": "tiny", "prompt": "warm", "max_tokens": 1})[1][0] == 200
    body = {"model": "tiny", "prompt": random_token_prompt(200, seed=31 + named), "max_tokens": 8, "temperature": 0}
    code, reply = post(servers["agg"].url, "/v1/completions", body)
    assert code == 200, reply
    tid = uuid.uuid4().hex
    with cf.ThreadPoolExecutor(1) as pool:
        decode = pool.submit(post, servers["decode"].url, "/v1/completions",
                             dict(body, kv_transfer_params={"kvbridge": {"transfer_id": tid, "receive": True}}))
        prefill = f"first-contact-{tid[:8]}#0" if named else ""
        notice = wire.PrefillAnswered(rid=1, transfer_id=tid, prefill=prefill)
        asyncio.run(ask(servers["decode"].handshake, notice, 5.0))
        if named:
            time.sleep(LATE_S)
            assert not trace(servers, tid).found, "still waiting for its producer"
        else:
            wait_for(lambda: trace(servers, tid).state == "EXPIRED", 10.0, 0.05, "the decode request gave up")
        pre = post(servers["prefill"].url, "/v1/completions", dict(body, max_tokens=1, kv_transfer_params={
            "kvbridge": {"transfer_id": tid, "push_to": servers["decode"].handshake}}))
        assert pre[0] == 200, pre
        code, got = decode.result()
    assert code == 200 and text_of(got) == text_of(reply)
    t = trace(servers, tid)
    assert t.state == ("SCATTERED" if named else "EXPIRED"), t  # unnamed: given up before its producer came
    wait_producer_idle(servers["prefill"])

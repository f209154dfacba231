"""The router's word to the decode connector about a transfer's prefill leg (router/prefill_leg.py): a cancel when
the leg failed, and `prefill_answered` when it answered but the decode leg still waits for KV
`ANSWERED_NOTICE_AFTER_S` later, dated back to the answer (a producer the connector has not heard from since the
answer cannot reach it: its request gives up `no_show_s` after the answer). A decode leg that streamed a token or
ended by then needs no notice, and gets none."""
from __future__ import annotations

import asyncio

import pytest

from router import prefill_leg
from router.app import PROXY
from router.prefill_leg import ANSWERED_NOTICE_AFTER_S
from tests.router_stubs import REQ, StubNode, eventually, post, transfer_id

STILL_WAITING_S = ANSWERED_NOTICE_AFTER_S + 0.5  # a stub decode node that answers this late was told


@pytest.mark.parametrize("dispatch", ["after_prefill", "with_prefill"])
@pytest.mark.parametrize("mode", ["ok", "reset"])
async def test_the_decode_connector_hears_that_the_prefill_answered_or_failed(make, mode, dispatch):
    """A prefill that answered is announced to a decode leg still waiting; a failed one is cancelled (recompute at
    once)."""
    # scattered: a decode that got the KV says so (a leg sent beside a prefill that answered may end first)
    pre = StubNode("p", mode=mode, die_after=0)
    dec = StubNode("d", kv=True, scattered=mode == "ok", interval=STILL_WAITING_S)
    url, api = await make([pre], [dec], decode_dispatch=dispatch)
    assert (await post(url, REQ))[0] == 200
    tid = transfer_id(pre)
    # a failed prefill pushed nothing: a decode leg sent after it prefills itself; one sent beside it waits for
    # KV until the cancel
    assert ("kv_transfer_params" in dec.bodies[0]) == (mode == "ok" or dispatch == "with_prefill")
    want = ([tid], []) if mode == "ok" else ([], [tid])
    assert await eventually(lambda: (dec.answered, dec.cancels) == want), (dec.answered, dec.cancels)
    # sent once due, and dated back to the answer: a producer heard from meanwhile is not taken for a no-show
    assert len(dec.answered_ago) == len(want[0]), dec.answered_ago
    assert all(ANSWERED_NOTICE_AFTER_S - 0.01 <= ago < STILL_WAITING_S for ago in dec.answered_ago), dec.answered_ago
    backend = api[PROXY].registry.backends["prefill"][0]  # the node, with its time up
    assert all(n.startswith(f"p#{backend.incarnation}.") for n in dec.answered_by), dec.answered_by


async def test_a_prefill_node_back_from_down_is_named_anew_its_producer_may_be_a_new_process(make):
    """The connector gives a prefill node it has not heard named before its handshake's grace (a new producer's
    first ALLOC waits for its handshake, transfer/answered_notices.py): after the node was down it is a new name."""
    pre = StubNode("p")
    dec = StubNode("d", kv=True, interval=STILL_WAITING_S)
    url, api = await make([pre], [dec], decode_dispatch="after_prefill")
    assert (await post(url, REQ))[0] == 200
    backend = api[PROXY].registry.backends["prefill"][0]
    assert await eventually(lambda: len(dec.answered_by) == 1)
    pre.healthy = False
    assert await eventually(lambda: backend.state == "down")
    pre.healthy = True
    assert await eventually(lambda: backend.state == "up")
    assert (await post(url, REQ))[0] == 200
    assert await eventually(lambda: len(dec.answered_by) == 2), dec.answered_by
    assert dec.answered_by[1] == backend.up_period != dec.answered_by[0], dec.answered_by


@pytest.mark.parametrize("mode", ["ok", "reset"])
async def test_every_tp_rank_of_the_decode_connector_hears_of_its_transfer(make, mode):
    """Each rank of a TP decode node is its own process with its own endpoint (port + rank) and book: a notice
    sent to rank 0 only would leave the other ranks waiting for their producers until load_timeout_s."""
    pre = StubNode("p", mode=mode, die_after=0)
    dec = StubNode("d", kv=True, ranks=3, interval=STILL_WAITING_S)
    # after_prefill: one notice per rank (a leg sent beside a failing prefill may end first and cancel it again)
    url, api = await make([pre], [dec], decode_dispatch="after_prefill")
    assert api[PROXY].registry.backends["decode"][0].ranks == 3  # learned from its connector's pool status
    assert (await post(url, REQ))[0] == 200
    tid = transfer_id(pre)
    kind = "prefill_answered" if mode == "ok" else "cancel"
    assert await eventually(lambda: dec.rank_notices == {1: [(kind, tid)], 2: [(kind, tid)]}), dec.rank_notices
    assert (dec.answered, dec.cancels) == (([tid], []) if mode == "ok" else ([], [tid]))


@pytest.mark.parametrize("stream", [False, True])
async def test_a_decode_leg_answering_soon_after_its_prefill_costs_its_connector_no_notice(make, monkeypatch, stream):
    """A decode leg that streamed its first token, or answered in full, before the notice was due had its KV (or
    computed the prompt): nothing is sent. (The notice is made due late here, so that a loaded machine's slow
    round trip cannot pass for one the notice was right to reach.)"""
    monkeypatch.setattr(prefill_leg, "ANSWERED_NOTICE_AFTER_S", 0.5)
    pre, dec = StubNode("p"), StubNode("d", kv=True)
    url, _ = await make([pre], [dec], decode_dispatch="after_prefill")
    assert (await post(url, dict(REQ, stream=stream)))[0] == 200
    assert "kv_transfer_params" in dec.bodies[0] and len(pre.bodies) == 1  # a PD request: the notice was possible
    await asyncio.sleep(0.8)
    assert (dec.answered, dec.cancels) == ([], [])


async def test_an_attempt_that_failed_after_its_prefill_answered_is_cancelled_and_never_announced(make, monkeypatch):
    """The decode leg failed before answering: its transfer is cancelled at once, and no notice follows the cancel
    once it is due (the connector would stamp a transfer it has already dropped)."""
    monkeypatch.setattr(prefill_leg, "ANSWERED_NOTICE_AFTER_S", 0.5)
    pre, dec = StubNode("p"), StubNode("d", mode="reset", kv=True)
    url, _ = await make([pre], [dec], decode_dispatch="after_prefill")
    assert (await post(url, REQ))[0] == 502
    tid = transfer_id(pre)
    assert await eventually(lambda: dec.cancels == [tid]), dec.cancels
    await asyncio.sleep(0.8)
    assert (dec.answered, dec.cancels) == ([], [tid])

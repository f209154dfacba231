"""Placement against stub backends (tests/router_stubs.py): the prefill node holding the longest prefix wins
over a shorter queue, a prefix the node evicted stops attracting, conditional disaggregation keeps short
prompts (and prompts the decode node holds) local and sends long ones remote, the mode can be pinned at
run time, and every decision is explained in /debug and counted by reason."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client import REGISTRY

from router.app import PROXY
from tests.router_stubs import StubNode, eventually, post

SYSTEM_A = "You are a careful assistant for the accounts team. " * 16  # ~830 characters, 13 chunks of 64
SYSTEM_B = "You answer questions about the shipping schedule only. " * 16


def body(prompt: str) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 4}


async def debug(url: str, rid: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/debug/requests/{rid}") as r:
        return await r.json()


async def send(url: str, prompt: str) -> dict:
    """One request, answered 200; its placement decision as /debug shows it."""
    status, headers, raw = await post(url, body(prompt))
    assert status == 200, raw
    return (await debug(url, headers["x-kvbridge-request-id"]))["placement"][-1]


def prefilled_on(nodes: list[StubNode], prompt: str) -> list[str]:
    return [n.name for n in nodes if any(b.get("prompt") == prompt for b in n.bodies)]


def placements(where: str, reason: str) -> float:
    return REGISTRY.get_sample_value("kvbridge_router_placement_total", {"where": where, "reason": reason}) or 0.0


async def while_busy(node: StubNode, url: str, prompt: str) -> dict:
    """Send `prompt` while `node` computes another (new, short) prompt that the router sent it first."""
    seen = len(node.bodies)
    slow = asyncio.create_task(post(url, body(f"busy {seen}: " + "x" * 200)))
    assert await eventually(lambda: len(node.bodies) > seen)
    try:
        return await send(url, prompt)
    finally:
        assert (await slow)[0] == 200


async def test_the_node_holding_the_longest_prefix_wins_until_it_evicts_it(make):
    p0, p1 = StubNode("p0", interval=1.0, store=True), StubNode("p1", store=True)
    dec = StubNode("d", kv=True, interval=1.0)  # the busy prompt's legs stay in flight while the next is placed
    url, _ = await make([p0, p1], [dec], policy="prefix_aware",
                        placement={"chunk_chars": 64, "node_capacity_chunks": 40})
    first = await send(url, SYSTEM_A + "first question")  # both idle, nothing held: the first listed
    assert first["prefill"] == "p0" and first["reason"] == "pinned_remote"
    # p0 is busy, but holds the whole system prompt: that outweighs its queue
    held = await while_busy(p0, url, SYSTEM_A + "second question")
    assert held["prefill"] == "p0" and held["reason"] == "pinned_remote_prefix", held
    cands = {c["prefill"]: c for c in held["candidates"]}
    assert cands["p0"]["held_tokens"] > 0 and cands["p1"]["held_tokens"] == 0 and cands["p0"]["queue_s"] > 0
    assert prefilled_on([p0, p1], SYSTEM_A + "second question") == ["p0"]
    # three more system prompts through p0 push SYSTEM_A out of its 40 chunks, as its LRU store would
    for i in range(3):
        assert (await send(url, f"{i} " + SYSTEM_B))["prefill"] == "p0"
    evicted = await while_busy(p0, url, SYSTEM_A + "third question")
    assert evicted["prefill"] == "p1" and evicted["reason"] == "pinned_remote", evicted
    assert prefilled_on([p0, p1], SYSTEM_A + "third question") == ["p1"]


@pytest.mark.parametrize("weight", [1.0, 0.0])
async def test_a_prefix_another_node_is_computing_is_not_computed_again_unless_copies_are_free(make, weight):
    """Two chats with one system prompt at once: the second queues behind the node computing it (and hits its
    cache there) instead of computing it on the idle node, unless duplicate_weight is 0."""
    p0, p1 = StubNode("p0", interval=1.0, store=True), StubNode("p1", store=True)
    dec = StubNode("d", kv=True)
    # after_prefill: the stub decode answers without waiting for KV, and sent beside the prefill leg it would
    # end the first request (and its prefill leg) before the second one is placed
    url, _ = await make([p0, p1], [dec], policy="prefix_aware", decode_dispatch="after_prefill",
                        placement={"chunk_chars": 64, "duplicate_weight": weight})
    first = asyncio.create_task(send(url, SYSTEM_A + "first question"))
    assert await eventually(lambda: len(p0.bodies) == 1)
    second = await send(url, SYSTEM_A + "second question")
    assert (await first)["prefill"] == "p0"
    cands = {c["prefill"]: c for c in second["candidates"]}
    assert second["prefill"] == ("p0" if weight else "p1"), second
    assert cands["p0"]["duplicate_s"] == 0 and cands["p0"]["held_tokens"] > 0 and cands["p0"]["queue_s"] > 0
    assert (cands["p1"]["duplicate_s"] > 0) == bool(weight) and cands[None]["duplicate_s"] == cands["p1"]["duplicate_s"]
    third = await send(url, SYSTEM_A + "third question")  # nothing in flight now: nothing is a copy
    assert all(c["duplicate_s"] == 0 for c in third["candidates"])


async def test_a_reply_showing_less_than_indexed_corrects_the_index(make):
    p0, p1 = StubNode("p0", store=True), StubNode("p1", store=True)
    dec = StubNode("d", kv=True, interval=0.2)  # answers after the prefill leg, as a decode waiting for KV does
    url, api = await make([p0, p1], [dec], policy="prefix_aware",
                          placement={"chunk_chars": 64, "reply_slack_tokens": 16})
    await send(url, SYSTEM_A + "one")
    p0.held.clear()  # p0 lost its store (a restart the router did not see)
    status, headers, _ = await post(url, body(SYSTEM_A + "two"))
    assert status == 200
    rid = headers["x-kvbridge-request-id"]
    decision = (await debug(url, rid))["placement"][0]
    assert decision["prefill"] == "p0" and decision["reason"] == "pinned_remote_prefix"  # predicted to hold it
    for _ in range(100):  # the correction comes with the prefill leg's reply, which may end after the answer
        notes = [e["detail"] for e in (await debug(url, rid))["events"] if e["phase"] == "prefix_index_corrected"]
        if notes:
            break
        await asyncio.sleep(0.05)
    assert notes and notes[0].startswith("p0 held 0 of"), notes
    # what p0 computed for "two" it holds now, and the index says so again
    index = api[PROXY].placement.index
    assert index.held("p0", index.keys(body(SYSTEM_A + "two"))) == len(index.keys(body(SYSTEM_A + "two")))


async def test_short_prompts_stay_local_and_long_ones_go_remote(make):
    pre, dec = StubNode("p", store=True), StubNode("d", kv=True)
    url, _ = await make([pre], [dec], placement={"mode": "auto"})
    short_local, long_remote = placements("local", "short_prompt"), placements("remote", "remote_cheaper")
    short = await send(url, "What is 2 + 2?")
    assert short["where"] == "local" and short["reason"] == "short_prompt"
    assert pre.bodies == [] and "kv_transfer_params" not in dec.bodies[-1]
    long_prompt = "Summarise the following report. " + "The quarter went well. " * 400
    far = await send(url, long_prompt)
    assert far["where"] == "remote" and far["reason"] == "remote_cheaper", far
    assert prefilled_on([pre], long_prompt) == ["p"] and dec.bodies[-1]["kv_transfer_params"]["kvbridge"]["receive"]
    # the decode node served that prompt: the next turn, which only adds a short suffix, stays there
    turn = await send(url, long_prompt + " And the next quarter?")
    assert turn["where"] == "local" and turn["reason"] == "decode_holds_prefix", turn
    assert placements("local", "short_prompt") == short_local + 1
    assert placements("remote", "remote_cheaper") == long_remote + 1


@pytest.mark.parametrize("details", [True, False])
async def test_an_idle_prefill_leg_teaches_the_prefill_rate_whether_or_not_vllm_reports_cached_tokens(make, details):
    """vLLM sends `prompt_tokens_details` only when started with --enable-prompt-tokens-details; without it the
    leg's compute is the prompt less what the index believed the node held, and the rate is learned all the
    same (auto dispatch times an idle decode node's leg by it)."""
    pre, dec = StubNode("p", store=True, details=details, interval=0.5), StubNode("d", kv=True, scattered=True)
    url, api = await make([pre], [dec], placement={"mode": "always", "prefill_tokens_per_s": 100000.0,
                                                   "request_s": 0.0})
    await send(url, "The quarter went well. " * 200)  # ~1150 tokens in 0.5 s: ~2300 tokens/s
    cost = api[PROXY].placement.rates.prefill
    assert await eventually(lambda: cost.samples == 1)
    # one length: no slope yet; the configured start (100000 tokens/s) still weighs as one 128-token leg
    assert 1500 < cost.tokens_per_s() < 2600 and cost.context_s == 0, cost.snapshot()


async def test_an_idle_prefill_legs_predicted_time_follows_a_cost_that_grows_with_the_prompt(make):
    """A token's compute grows with the context before it, so a prompt twice as long takes more than twice as
    long: after legs of two lengths the router predicts a longer prompt's leg (auto dispatch times an idle
    decode node's leg by it), as /debug/requests shows, to within a tenth (one rate: a fifth short)."""
    def leg_s(body: dict) -> float:  # the stub reports 4 characters a token
        tokens = len(body["prompt"]) // 4
        return 0.02 + tokens * (1.5e-4 + 3e-7 * tokens / 2)
    pre, dec = StubNode("p", store=True, details=False, interval=leg_s), StubNode("d", kv=True, scattered=True)
    url, api = await make([pre], [dec], placement={"mode": "always", "request_s": 0.02})
    words = iter(range(10 ** 6))
    placement = api[PROXY].placement

    def prompt(tokens: int) -> str:  # 8 characters a word, none shared with another prompt
        return "".join(f"w{next(words):06d} " for _ in range(tokens // 2))
    for tokens in [400, 1600] * 3:
        await send(url, prompt(tokens))  # the decode stub answers at once: wait for the prefill leg, idle again
        assert await eventually(lambda: not placement.pending_requests.get("p"))
    assert placement.rates.prefill.samples == 6
    decision = await send(url, prompt(2000))
    assert decision["prefill_eta_s"] == pytest.approx(leg_s({"prompt": "x" * 8000}), rel=0.1), decision


async def test_the_mode_can_be_pinned_at_run_time(make):
    pre, dec = StubNode("p"), StubNode("d", kv=True)
    url, _ = await make([pre], [dec], placement={"mode": "auto"})
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/admin/placement", json={"mode": "always"}) as r:
            assert r.status == 200 and (await r.json())["mode"] == "always"
        assert (await send(url, "hi"))["where"] == "remote" and len(pre.bodies) == 1
        async with s.post(url + "/admin/placement", json={"mode": "never"}) as r:
            assert r.status == 200
        long_prompt = "word " * 3000
        assert (await send(url, long_prompt))["reason"] == "pinned_local" and len(pre.bodies) == 1
        async with s.post(url + "/admin/placement", json={"mode": "sometimes"}) as r:
            assert r.status == 400
        async with s.get(url + "/debug/placement") as r:
            snap = await r.json()
    assert snap["mode"] == "never" and snap["break_even_tokens"] > 0 and "prefill_tokens_per_s" in snap["rates"]


async def test_echo_is_served_local_whatever_the_mode(make):
    pre, dec = StubNode("p"), StubNode("d", kv=True)
    url, _ = await make([pre], [dec], policy="prefix_aware")
    status, headers, _ = await post(url, dict(body("hello"), echo=True))
    assert status == 200 and pre.bodies == []
    decision = (await debug(url, headers["x-kvbridge-request-id"]))["placement"][0]
    assert decision["reason"] == "aggregated_echo" and decision["where"] == "local"


async def test_the_next_turn_goes_to_the_decode_node_holding_the_conversation(make):
    d0, d1 = StubNode("d0", kv=True, interval=0.3), StubNode("d1", kv=True, interval=0.3)
    url, _ = await make([StubNode("p")], [d0, d1], policy="prefix_aware", placement={"mode": "auto"})
    a, b = "Conversation A. " + SYSTEM_A * 3, "Conversation B. " + SYSTEM_B * 3
    # both first turns at once: the second finds d0 busy with the first and goes to d1
    first = await asyncio.gather(send(url, a), send(url, b))
    assert sorted(f["decode"] for f in first) == ["d0", "d1"]
    served = {f["decode"]: prompt for f, prompt in zip(first, (a, b))}
    for name, prompt in sorted(served.items()):  # one at a time, both nodes idle: only the history decides
        nxt = await send(url, prompt + " Next question?")
        assert nxt["decode"] == name and nxt["where"] == "local" and nxt["reason"] == "decode_holds_prefix", nxt


def test_prefix_keys_are_the_same_in_another_process():
    import subprocess
    import sys

    from router.prefix_index import prefix_keys
    code = "import sys; from router.prefix_index import prefix_keys; print(','.join(prefix_keys(sys.argv[1], 64)))"
    text = SYSTEM_A + "é ü 漢字"
    other = subprocess.run([sys.executable, "-c", code, text], capture_output=True, text=True, check=True)
    keys = prefix_keys(text, 64)
    assert other.stdout.strip().split(",") == keys and len(keys) == len(text.encode()) // 64
    assert prefix_keys(text[:200] + "x" + text[201:], 64)[:3] == keys[:3] != prefix_keys("y" + text[1:], 64)[:3]


async def test_a_prefix_in_the_shared_tier_counts_for_every_prefill_node(make):
    p0, p1 = StubNode("p0", interval=1.0, store=True), StubNode("p1", store=True)
    url, _ = await make([p0, p1], [StubNode("d", kv=True, interval=1.0)], policy="prefix_aware",
                        placement={"chunk_chars": 64, "shared_store": True})
    assert (await send(url, SYSTEM_A + "first"))["prefill"] == "p0"
    # p0 is busy; p1 never computed SYSTEM_A, but loads it from the shared tier: it wins, priced for the load
    shared = await while_busy(p0, url, SYSTEM_A + "second")
    cands = {c["prefill"]: c for c in shared["candidates"] if c["prefill"]}
    assert shared["prefill"] == "p1" and shared["reason"] == "pinned_remote_prefix", shared
    assert cands["p1"]["held_tokens"] > 0 and cands["p1"]["shared_load_s"] > 0 and cands["p0"]["shared_load_s"] == 0


async def test_a_node_seen_down_is_forgotten_and_relearned_from_its_replies(make):
    p0, p1 = StubNode("p0", store=True), StubNode("p1", store=True)
    dec = StubNode("d", kv=True, interval=0.2)
    url, api = await make([p0, p1], [dec], policy="prefix_aware",
                          placement={"chunk_chars": 64, "reply_slack_tokens": 16})
    index = api[PROXY].placement.index
    await send(url, SYSTEM_A + "one")
    keys = index.keys(body(SYSTEM_A + "two"))
    assert index.held("p0", keys) > 0
    p0.healthy = False  # a restart, as the router sees it: down, then up again with its disk tier
    assert await eventually(lambda: api[PROXY].registry.backends["prefill"][0].state == "down")
    p0.healthy = True
    assert await eventually(lambda: api[PROXY].registry.backends["prefill"][0].state == "up")
    status, headers, _ = await post(url, body(SYSTEM_B + "other"))  # any request: the down node is forgotten
    assert status == 200 and index.held("p0", keys) == 0
    # both idle, neither indexed for SYSTEM_A: p0, listed first; its reply reports the prefix its disk kept
    rid = (await post(url, body(SYSTEM_A + "two")))[1]["x-kvbridge-request-id"]
    for _ in range(100):
        notes = [e["detail"] for e in (await debug(url, rid))["events"] if e["phase"] == "prefix_index_corrected"]
        if notes:
            break
        await asyncio.sleep(0.05)
    assert notes and "more than indexed: learned" in notes[0], notes

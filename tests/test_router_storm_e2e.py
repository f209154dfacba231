"""The router under load against real vLLM (issue 13).

A storm: hundreds of requests, a third of the clients leaving at random moments mid-prefill and
mid-stream. Every client that stayed gets the aggregated server's answer (greedy), the router never
marks the healthy decode node anything but up, and the decode slots and prefill staging are back to
full right after the last request (not after a TTL).

A decode node killed (-9) under load, with a second decode node: started streams end with an error
event and [DONE] at once, non-streamed requests are retried on the other node, nothing hangs."""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal

import time

import aiohttp
import pytest
import requests

from launch.local_servers import SERVED_MODEL, free_port, start_router, start_vllm
from launch.polling import wait_for
from launch.tiny_prompts import random_words
from router.config import RouterConfig
from tests.pd_client import pool_status, wait_producer_idle

pytestmark = pytest.mark.usefixtures("decode_pool_full_after")
REQUESTS, CONCURRENCY, PROMPTS, MAX_TOKENS = 300, 24, 24, 16
RELEASE_WITHIN_S = 2.5  # the connector's own expiry would take load_timeout_s (4 s) or a lease TTL


def reference_answers(agg_url: str) -> list[str]:
    out = []
    for i in range(PROMPTS):
        body = {"model": "tiny", "prompt": random_words(20 + 7 * i, seed=1300 + i), "max_tokens": MAX_TOKENS,
                "temperature": 0}
        out.append(requests.post(agg_url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"])
    return out


async def one_client(s: aiohttp.ClientSession, url: str, rng: random.Random, i: int) -> tuple[str, int, str]:
    """(how this client behaved, HTTP status, text it got). A third leave: mid-prefill (before any answer)
    or mid-stream (after a few events)."""
    p = i % PROMPTS
    stream = rng.random() < 0.6
    leave = rng.choice(["mid_prefill", "mid_stream", None, None, None, None]) if stream else \
        rng.choice(["mid_prefill", None])
    body = {"model": "tiny", "prompt": random_words(20 + 7 * p, seed=1300 + p), "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": stream}
    if leave == "mid_prefill":
        try:
            r = await asyncio.wait_for(s.post(url + "/v1/completions", json=body), rng.uniform(0.01, 0.4))
            r.close()  # the answer began before this client's patience ran out: it leaves all the same
        except asyncio.TimeoutError:
            pass
        return "left", 0, ""
    async with s.post(url + "/v1/completions", json=body) as r:
        if r.status != 200 or not stream:
            raw = await r.read()
            return "stayed", r.status, json.loads(raw)["choices"][0]["text"] if r.status == 200 else raw.decode()
        if leave == "mid_stream":
            for _ in range(rng.randint(1, 3)):
                await r.content.readuntil(b"\n\n")
            r.close()
            return "left", 0, ""
        text = []
        for event in (await r.read()).decode().split("\n\n"):
            data = event.removeprefix("data: ").strip()
            if data and data != "[DONE]":
                chunk = json.loads(data)
                assert "error" not in chunk and "kv_transfer_params" not in chunk, chunk
                text.append(chunk["choices"][0]["text"])
        return "stayed", 200, "".join(text)


async def storm(url: str) -> tuple[list[tuple[int, str, int, str]], set[str]]:
    rng = random.Random(13)
    results, states_seen, done = [], set(), asyncio.Event()
    todo = iter(range(REQUESTS))

    async def worker(s: aiohttp.ClientSession) -> None:
        for i in todo:
            results.append((i, *await one_client(s, url, rng, i)))

    async def watch_health(s: aiohttp.ClientSession) -> None:
        while not done.is_set():
            async with s.get(url + "/health") as r:
                states_seen.update(b["state"] for b in (await r.json())["instances"]["decode"])
            await asyncio.sleep(0.05)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        watcher = asyncio.create_task(watch_health(s))
        await asyncio.gather(*(worker(s) for _ in range(CONCURRENCY)))
        done.set()
        await watcher
    return results, states_seen


def test_storm_with_a_third_of_clients_leaving(servers, router):
    expected = reference_answers(servers["agg"].url)
    results, states_seen = asyncio.run(storm(router.url))
    # released at once: slots and staging back to full right after the last request
    wait_for(lambda: (st := pool_status(servers["decode"].handshake)).free == st.total, RELEASE_WITHIN_S,
             what="decode slot pool back to full")
    wait_producer_idle(servers["prefill"], RELEASE_WITHIN_S)
    stayed = [r for r in results if r[1] == "stayed"]
    left = len(results) - len(stayed)
    assert len(results) == REQUESTS and REQUESTS // 5 < left < REQUESTS // 2, left
    wrong = [(i, status, text, expected[i % PROMPTS]) for i, _, status, text in stayed
             if status != 200 or text != expected[i % PROMPTS]]
    assert wrong == [], wrong[:5]
    assert states_seen == {"up"}, states_seen
    health = requests.get(router.url + "/health", timeout=5).json()
    assert [b["state"] for b in health["instances"]["decode"]] == ["up"]


@pytest.fixture(scope="module")
def two_decode_router(servers):
    """A second decode node (this module's own, so killing it leaves the shared ones alone) and a router
    in front of the shared prefill and both decode nodes."""
    extra = start_vllm("decode-1", "decode", {"checksum": True, "load_timeout_s": 4.0, "num_slots": 32})
    try:
        extra.wait_ready()
        decodes = [servers["decode"], extra]
        router = start_router(RouterConfig(
            port=free_port(), model=SERVED_MODEL, policy="round_robin", health_interval_s=0.5, health_timeout_s=3,
            prefill=[{"name": servers["prefill"].name, "url": servers["prefill"].url}],
            decode=[{"name": d.name, "url": d.url, "kv_address": d.handshake} for d in decodes]))
        yield router, extra
        router.stop()
    finally:
        extra.stop()


KILL_PROMPTS, KILL_TOKENS, KILL_REQUESTS = 8, 300, 160
PRODUCER_IDLE_WITHIN_S = 20.0  # after the load ends; one 2 s RPC timeout per dead transfer took ~90 s for 22
# (0.4 s measured with this test alone; the whole suite on 2 cores needs more)


def decode_states(router_url: str) -> list[str]:
    """The router's view of its decode nodes (decode-0, decode-1)."""
    return [d["state"] for d in requests.get(router_url + "/health", timeout=5).json()["instances"]["decode"]]


async def dispatch_of(s: aiohttp.ClientSession, url: str, r: aiohttp.ClientResponse) -> str:
    """Where the router sent this request last (its trace's last `dispatched` event)."""
    async with s.get(f"{url}/debug/requests/{r.headers['x-kvbridge-request-id']}") as t:
        return [e for e in (await t.json())["events"] if e["phase"] == "dispatched"][-1]["detail"]


async def kill_under_load(url: str, victim) -> tuple[list[dict], float]:
    """KILL_REQUESTS at once (half streamed); decode-1 killed while at least one of its streams is flowing.

    A stream can finish on the server before its client (sharing one busy event loop with 159 others) has
    read its first event, so the victim is frozen (SIGSTOP) first, at the first event of any stream; once no event
    of its has arrived for a moment, what its clients saw is all it sent: if one of its streams is then unfinished
    it is killed, else it goes on (SIGCONT) until the next of its streams begins."""
    victim_streaming, flowing, last_event, t_kill = asyncio.Event(), set(), [0.0], [0.0]
    any_streaming = asyncio.Event()  # the first event of any stream: the first freeze comes then

    async def client(s: aiohttp.ClientSession, i: int) -> dict:
        p, stream = i % KILL_PROMPTS, i % 4 < 2  # round robin alternates decodes: each gets both kinds
        body = {"model": "tiny", "prompt": random_words(30 + 5 * p, seed=1700 + p), "max_tokens": KILL_TOKENS,
                "temperature": 0, "ignore_eos": True, "stream": stream}
        async with s.post(url + "/v1/completions", json=body) as r:
            if not stream:
                return {"i": i, "stream": False, "status": r.status, "body": await r.read(), "end": time.monotonic()}
            events, on_victim = [], False
            while event := await r.content.readuntil(b"\n\n"):
                events.append(event.decode().removeprefix("data: ").strip())
                if len(events) == 1 and r.status == 200:
                    any_streaming.set()
                    on_victim = "decode=decode-1" in await dispatch_of(s, url, r)
                if on_victim:
                    last_event[0] = time.monotonic()
                    (flowing.discard if events[-1] == "[DONE]" else flowing.add)(i)
                    victim_streaming.set()
            return {"i": i, "stream": True, "status": r.status, "events": events, "end": time.monotonic()}

    async def killer() -> None:
        # First frozen at the first event of any stream, before a client has learnt where its stream runs (one
        # more router call): waiting for a decode-1 event first, every decode-1 stream could end in the meantime.
        await asyncio.wait_for(any_streaming.wait(), 60)
        while True:
            os.killpg(victim.proc.pid, signal.SIGSTOP)
            await asyncio.sleep(1.0)  # its clients read what it sent and learn where their streams run
            while time.monotonic() - last_event[0] < 1.0:  # its clients read what it sent before it froze
                await asyncio.sleep(0.1)
            if flowing:
                break
            victim_streaming.clear()
            os.killpg(victim.proc.pid, signal.SIGCONT)
            await asyncio.wait_for(victim_streaming.wait(), 60)
        victim.kill9()
        t_kill[0] = time.monotonic()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90),
                                     connector=aiohttp.TCPConnector(limit=0)) as s:
        *results, _ = await asyncio.gather(*(client(s, i) for i in range(KILL_REQUESTS)), killer())
    return results, t_kill[0]


def test_decode_killed_under_load_streams_end_with_error_and_unstreamed_are_retried(servers, two_decode_router,
                                                                                     failure_report):
    router, victim = two_decode_router
    expected = []
    for p in range(KILL_PROMPTS):
        body = {"model": "tiny", "prompt": random_words(30 + 5 * p, seed=1700 + p), "max_tokens": KILL_TOKENS,
                "temperature": 0, "ignore_eos": True}
        expected.append(requests.post(servers["agg"].url + "/v1/completions", json=body, timeout=60).json())
    # In a whole-suite run decode-1's /health went unanswered for 3 s while the answers above were computed: it was
    # suspect while all the requests were placed, got none, and the killer waited for a decode-1 stream in vain
    wait_for(lambda: decode_states(router.url) == ["up", "up"], 30, 0.25, "both decode nodes up before the load")
    results, t_kill = asyncio.run(kill_under_load(router.url, victim))
    texts = [e["choices"][0]["text"] for e in expected]
    for r in (r for r in results if not r["stream"]):  # nothing sent yet when decode-1 died: retried on decode-0
        assert r["status"] == 200 and json.loads(r["body"])["choices"][0]["text"] == texts[r["i"] % KILL_PROMPTS]
    cut = []
    for r in (r for r in results if r["stream"]):
        assert r["status"] == 200 and r["events"][-1] == "[DONE]", r
        chunks = [json.loads(e) for e in r["events"][:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks if "choices" in c)
        if "error" in chunks[-1]:  # cut mid-stream: an error event right after the kill, what came before is right
            cut.append(r["end"] - t_kill)
            assert texts[r["i"] % KILL_PROMPTS].startswith(text)
        else:
            assert text == texts[r["i"] % KILL_PROMPTS]
    assert cut and max(cut) < 5.0, cut  # kill -9 closes the sockets: no stream waits on a node that is gone
    # The prefill node's producer learnt of the dead consumer from its connection: no transfer to it left,
    # staging back to full (not after one RPC timeout per transfer it had there).
    wait_producer_idle(servers["prefill"], PRODUCER_IDLE_WITHIN_S)
    idle_after_s = time.monotonic() - t_kill
    # decode-0 was never taken out; a /health answered late on two saturated cores may have made it suspect
    # for a moment (routable still), so its state is read once the checks have caught up with the quiet
    assert " decode decode-0 is now DOWN" not in router.log_path.read_text(errors="replace")
    wait_for(lambda: decode_states(router.url) == ["up", "down"], 15, 0.25, "decode-0 up and decode-1 down")
    retries = [ln for ln in requests.get(router.url + "/metrics", timeout=5).text.splitlines()
               if ln.startswith("kvbridge_router_retries_total")]
    assert retries and float(retries[0].rsplit(" ", 1)[1]) > 0, retries  # some moved to decode-0 before a byte
    body = {"model": "tiny", "prompt": random_words(30, seed=1700), "max_tokens": 8, "temperature": 0}
    after = requests.post(router.url + "/v1/completions", json=body, timeout=30)  # still serving, on decode-0
    assert after.status_code == 200 and texts[0].startswith(after.json()["choices"][0]["text"]), after.text
    failure_report("kill -9 decode under load (2 decodes)", f"{len(cut)} streams cut with an error event, "
                   f"unstreamed retried on decode-0, all answers right; load ended {max(r['end'] for r in results) - t_kill:.1f} s "
                   f"after the kill", max(cut), idle_after_s,
                   "none: prefill staging full, no producer transfer left")

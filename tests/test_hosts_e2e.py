"""PD across hosts: prefill, decode and router in three network namespaces on one box, joined by
shaped veth links; KV moves over TCP (UCX_TLS=tcp) and every control message is signed."""
from __future__ import annotations

import concurrent.futures as cf
import itertools
import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
import requests

from launch.local_servers import LOG_DIR
from launch.netns import LinkShape
from launch.polling import wait_for
from launch.tiny_prompts import random_token_prompt
from launch.process_handle import ROOT
from tests.hosts_fixtures import DECODE, LINK, PREFILL
from tests.pd_client import text_of
from transfer.push_token import push_key, sign

MAX_TOKENS = 12
_pool = cf.ThreadPoolExecutor(4)


@pytest.fixture
def pools_full_after(hosts):
    """Every test leaves the decode's slot pool and the producer's staging full, and no transfer held."""
    yield
    def full() -> bool:
        st, m = hosts.pool_status(), hosts.producer_metrics()
        return (st.free == st.total and m.get("kvbridge_producer_active_transfers") == 0 and
                m.get("kvbridge_producer_staging_free_slots") == m.get("kvbridge_producer_staging_slots"))
    try:
        wait_for(full, 15, interval=0.5)
    except TimeoutError:
        raise AssertionError(f"not back to full: {hosts.pool_status()} {hosts.producer_metrics()}") from None


def answers_equal(hosts, n: int, seed: int) -> int:
    """One PD request through the router equals the prefill host's own answer; the tokens whose KV the
    decode scattered for it."""
    body = {"model": "tiny", "prompt": random_token_prompt(n, seed=seed), "max_tokens": MAX_TOKENS, "temperature": 0}
    code, want = hosts.reference("/v1/completions", body)
    assert code == 200, want
    before = hosts.pool_status().counters.get("tokens_scattered", 0)
    code, got = hosts.post("/v1/completions", body)
    assert code == 200, got
    assert text_of(got) == text_of(want)
    return hosts.pool_status().counters.get("tokens_scattered", 0) - before


def until_kv_moves_again(hosts, seed: int, timeout: float = 60) -> float:
    """After a network fault: PD requests (each answered correctly) until one's KV crosses the link again,
    with nothing restarted; the seconds that took. The producer's link to a consumer that left a call
    unanswered fails calls at once for one RPC timeout, and TCP retransmits on its own backoff."""
    t0, seeds = time.monotonic(), itertools.count(seed * 1000)  # a new prompt each: none cached on the decode
    wait_for(lambda: answers_equal(hosts, 600, next(seeds)) == 600, timeout, interval=0.5, what="KV moving again")
    return time.monotonic() - t0


@pytest.mark.usefixtures("pools_full_after")
@pytest.mark.parametrize("n", [300, 1000])
def test_pd_across_hosts_equals_aggregated(hosts, n):
    """The decode listens on its host's address (signed control plane), the router and the prefill
    reach it only over their links, and the KV of the whole prompt arrives over TCP."""
    assert hosts.decode.handshake.startswith("198.18.")
    assert answers_equal(hosts, n, seed=n) == n


def kvbridge(hosts, *args: str) -> str:
    """A `kvbridge` command run as an operator runs it: a process of its own, outside every host."""
    out = subprocess.run([sys.executable, "-m", "launch.cli", *args, str(hosts.graph), "--log-dir", str(LOG_DIR)],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, KVBRIDGE_SECRET=hosts.secret, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def test_status_and_store_reach_every_host_from_the_router_host(hosts):
    """`kvbridge status` and `kvbridge store` find the hosts `kvbridge up` placed and ask each part where it
    is served (they asked the graph's unplaced loopback addresses, and found nothing)."""
    assert answers_equal(hosts, 300, seed=44) == 300  # a prompt the prefill node's store keeps
    rows = {r["name"]: r for r in json.loads(kvbridge(hosts, "status", "--json"))}
    assert {name: r["health"] for name, r in rows.items()} == {"router": "ok", PREFILL: "ok", DECODE: "ok"}
    assert rows[DECODE]["router_view"] == "up" and rows[DECODE]["slots"].endswith("/32"), rows[DECODE]
    assert rows[PREFILL]["staging"], rows[PREFILL]  # the prefill connector's metrics, on its host's address
    stored = re.search(rf"{PREFILL}\s+memory\s+(\d+) chunks", kvbridge(hosts, "store", "stats"))
    assert stored and int(stored.group(1)) > 0


def test_pd_moves_the_kv_over_the_prefill_decode_link(hosts):
    """What the decode received over its link from the prefill host covers the KV it scattered: the
    bytes really crossed the veth (not shared memory, not the router's link)."""
    net, hp, hd = hosts.placed.net, hosts.host(PREFILL), hosts.host(DECODE)
    before_link, before_kv = net.received(hp, hd), hosts.pool_status().counters.get("bytes_received", 0)
    assert answers_equal(hosts, 900, seed=900) == 900
    kv = hosts.pool_status().counters["bytes_received"] - before_kv
    assert kv > 0 and net.received(hp, hd) - before_link >= kv


def _send(hosts, body: dict) -> cf.Future:
    return _pool.submit(hosts.post, "/v1/completions", body)


def _on_prefill_host(hosts, body: dict) -> requests.Response:
    with hosts.on(PREFILL):
        return requests.post(hosts.prefill.url + "/v1/completions", json=body, timeout=120)


def test_partition_of_the_prefill_decode_link_mid_transfer(hosts, pools_full_after, failure_report):
    """The P-D link goes down while KV is on it (the link slowed so the push takes seconds, cut once
    bytes are arriving): the decode recomputes by policy, answers the same, and nothing is held; once the
    link is back the next request's KV crosses it again, with no restart of anything."""
    net, hp, hd = hosts.placed.net, hosts.host(PREFILL), hosts.host(DECODE)
    n = 1500
    body = {"model": "tiny", "prompt": random_token_prompt(n, seed=31), "max_tokens": MAX_TOKENS, "temperature": 0}
    want = text_of(hosts.reference("/v1/completions", body)[1])
    fences = hosts.pool_status().counters.get("fences_received", 0)
    net.shape(hp, hd, LinkShape(rate="2mbit"))
    try:
        start = net.received(hp, hd)
        t0 = time.monotonic()
        fut = _send(hosts, body)
        wait_for(lambda: net.received(hp, hd) - start > 64 * 1024, 30, interval=0.02, what="KV arriving")
        net.set_link(hp, hd, up=False)
        code, got = fut.result()
        took = time.monotonic() - t0
    finally:
        net.set_link(hp, hd, up=True)
        net.shape(hp, hd, LinkShape(rate=LINK["rate"]))
    assert code == 200 and text_of(got) == want, got
    assert took < 3.0 + 4.0 + 5.0, f"took {took:.1f}s; bound: lease_ttl_s 3 + load_timeout_s 4 + 5"
    wait_for(lambda: (st := hosts.pool_status()).free == st.total, 30, interval=0.5, what="decode slots back")
    # the producer gave up on writes the cut link held: its fence crossed the restored link after them
    assert hosts.pool_status().counters.get("fences_received", 0) > fences
    resumed = until_kv_moves_again(hosts, seed=32)
    failure_report("P-D link down mid-transfer (other links up)", "decode recomputed, same tokens; transfers "
                   "over the restored link again without restarts", took, resumed,
                   "none: decode slots and prefill staging full")


def test_a_vanished_decode_host_is_noticed_without_tcp_timeouts(hosts, pools_full_after, failure_report):
    """Every link of the decode host goes down, its processes alive: the router's health probe and the
    producer's calls time out on their own bounds (not TCP's minutes): the router stops routing to it, a
    prefill leg pushing there ends and frees its staging; when the host is back, both use it again."""
    net, hd = hosts.placed.net, hosts.host(DECODE)
    n = 600
    body = {"model": "tiny", "prompt": random_token_prompt(n, seed=41), "max_tokens": 1, "temperature": 0}
    tid = uuid.uuid4().hex
    token = sign(push_key(hosts.secret.encode()), tid, hosts.decode.handshake, 60)
    leg = dict(body, kv_transfer_params={"kvbridge": {"transfer_id": tid, "push_to": hosts.decode.handshake,
                                                      "push_token": token}})
    net.set_host_reachable(hd, up=False)
    try:
        t0 = time.monotonic()
        prefill_leg = _pool.submit(_on_prefill_host, hosts, leg)
        wait_for(lambda: hosts.router_health() != 200, 30, interval=0.1, what="router noticing the decode host")
        router_s = time.monotonic() - t0
        assert prefill_leg.result().status_code == 200
        wait_for(lambda: (m := hosts.producer_metrics()).get("kvbridge_producer_active_transfers") == 0 and
                 m.get("kvbridge_producer_staging_free_slots") == m.get("kvbridge_producer_staging_slots"),
                 30, interval=0.1, what="producer giving up on the vanished consumer")
        producer_s = time.monotonic() - t0
    finally:
        net.set_host_reachable(hd, up=True)
    assert router_s < 5.0, f"router took {router_s:.1f}s (health interval 0.5 + timeout 1)"
    assert producer_s < 3.0 + 2.0 + 5.0, f"producer took {producer_s:.1f}s (alloc 3 + rpc 2 + 5)"
    t_up = time.monotonic()
    wait_for(lambda: hosts.router_health() == 200, 30, interval=0.2, what="router taking the decode back")
    until_kv_moves_again(hosts, seed=42)
    resumed = time.monotonic() - t_up
    failure_report("decode host vanished (links down, processes alive)", f"router noticed in {router_s:.1f}s, "
                   f"producer freed its staging in {producer_s:.1f}s; used again when back",
                   max(router_s, producer_s), resumed, "none: slots and staging full")


def test_loss_and_delay_slow_transfers_but_never_change_an_answer(hosts, pools_full_after, failure_report):
    """5 % of packets dropped and 20 ms each way on the prefill-decode link: TCP retransmits, pushes take
    longer, every answer stays equal to aggregated; a push the link delays past a bound is recomputed
    by policy, which costs time and never tokens."""
    net, hp, hd = hosts.placed.net, hosts.host(PREFILL), hosts.host(DECODE)
    n, seeds = 1000, range(51, 55)
    clean = []
    for seed in seeds[:2]:
        t0 = time.monotonic()
        assert answers_equal(hosts, n, seed=seed) == n
        clean.append(time.monotonic() - t0)
    moved, lossy = [], []
    for a, b in ((hp, hd), (hd, hp)):
        net.shape(a, b, LinkShape(rate=LINK["rate"], delay="20ms", loss=5.0))
    try:
        for seed in seeds[2:]:
            t0 = time.monotonic()
            moved.append(answers_equal(hosts, n, seed=seed * 10))
            lossy.append(time.monotonic() - t0)
    finally:
        for a, b in ((hp, hd), (hd, hp)):
            net.shape(a, b, LinkShape(rate=LINK["rate"]))
    assert any(m == n for m in moved), f"no KV crossed the lossy link: scattered {moved}"
    failure_report("5 % loss + 20 ms delay on the P-D link", f"answers equal; request time {max(clean):.2f} s "
                   f"clean -> {max(lossy):.2f} s lossy (max of {len(lossy)}); KV moved for "
                   f"{sum(m == n for m in moved)}/{len(moved)}", None, None, "none: slots and staging full")

"""Failure handling with real vLLM: pool exhaustion, an abort storm, kill -9 of the prefill node, a lease
that expires mid-transfer while its producer is frozen."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import aiohttp
import psutil
import pytest
import requests

from launch.local_servers import MODEL_DIR, start_vllm
from launch.polling import wait_for
from launch.process_handle import ROOT
from launch.tiny_prompts import random_token_prompt
from pd.prefix_store import model_fingerprint
from transfer.identity import TransferSpec
from tests.pd_client import pd_request, pool_status, post, text_of, wait_producer_idle

pytestmark = pytest.mark.usefixtures("decode_pool_full_after")


def kv_usage(url: str) -> float:
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:kv_cache_usage_perc"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vllm:kv_cache_usage_perc not exported")


def wait_kv_free(url: str, timeout: float = 10) -> None:
    """Until vLLM's own block pool on `url` is 0 % used: nothing of a finished or aborted request is left."""
    try:
        wait_for(lambda: kv_usage(url) == 0, timeout, interval=0.2)
    except TimeoutError:
        raise AssertionError(f"{url}: vLLM KV cache still {kv_usage(url):.1%} used after {timeout}s") from None


def test_pool_exhaustion_everything_completes_correctly(servers, failure_report):
    """12 x 1000-token prompts need 48 slots; the decode pool has 32. Nobody hangs, every answer is right."""
    bodies = [{"model": "tiny", "prompt": random_token_prompt(1000, seed=200 + i), "max_tokens": 8,
               "temperature": 0} for i in range(12)]
    with cf.ThreadPoolExecutor(12) as ex:
        wants = list(ex.map(lambda b: text_of(post(servers["agg"].url, "/v1/completions", b)[1]), bodies))
        t0 = time.monotonic()
        got = list(ex.map(lambda b: pd_request(servers, "/v1/completions", b), bodies))
    took = time.monotonic() - t0
    assert took < 60
    for (pre, dec), want in zip(got, wants):
        assert pre[0] == 200 and dec[0] == 200
        assert text_of(dec[1]) == want
    wait_kv_free(servers["decode"].url)
    wait_kv_free(servers["prefill"].url)
    wait_producer_idle(servers["prefill"])
    failure_report("pool exhaustion", f"12 x 1000-token prompts want 48 slots, 32 exist: NO_CAPACITY, producers "
                   f"waited, all 12 correct in {took:.1f}s", None, None, "none")


def test_abort_storm_releases_everything(servers, router, failure_report):
    """200 requests through the router, a fifth of the clients disconnect at random points."""
    n = 200
    rng = random.Random(1)
    bodies = [{"model": "tiny", "prompt": random_token_prompt(rng.choice([100, 400, 900]), seed=300 + i),
               "max_tokens": 24, "temperature": 0} for i in range(n)]
    cancel_after = {i: rng.uniform(0.0, 3.0) for i in rng.sample(range(n), n // 5)}

    async def storm() -> list[tuple[int, str | None]]:
        async with aiohttp.ClientSession() as s:
            async def one(i: int) -> tuple[int, str | None]:
                async def go() -> str:
                    async with s.post(router.url + "/v1/completions", json=bodies[i]) as r:
                        assert r.status == 200, await r.text()
                        return (await r.json())["choices"][0]["text"]
                if i in cancel_after:
                    try:
                        return i, await asyncio.wait_for(go(), cancel_after[i])
                    except asyncio.TimeoutError:
                        return i, None
                return i, await go()
            return await asyncio.gather(*(one(i) for i in range(n)))

    t0 = time.monotonic()
    results = asyncio.run(storm())
    t_storm = time.monotonic() - t0
    completed = [(i, t) for i, t in results if t is not None]
    assert len(completed) >= n - n // 5
    t1 = time.monotonic()
    wait_kv_free(servers["decode"].url, 20)
    wait_kv_free(servers["prefill"].url, 20)
    wait_producer_idle(servers["prefill"])
    settle = time.monotonic() - t1
    with cf.ThreadPoolExecutor(4) as ex:
        wants = list(ex.map(lambda i: text_of(post(servers["agg"].url, "/v1/completions", bodies[i])[1]),
                            [i for i, _ in completed]))
    wrong = [i for (i, text), want in zip(completed, wants) if text != want]
    assert not wrong, f"{len(wrong)} of {len(completed)} completed answers differ from aggregated: {wrong[:10]}"
    failure_report("abort storm", f"{n} requests, {n - len(completed)} clients left; {len(completed)} answers all "
                   f"correct; storm took {t_storm:.1f}s", None, settle,
                   "none: both vLLM block pools 0 % used, decode slots and prefill staging full")


def freeze_engine(server) -> None:
    """SIGSTOP every process under the API server (vLLM's engine core and its worker): the API server
    still accepts requests and hands them on, but nothing computes or pushes."""
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        child.send_signal(signal.SIGSTOP)


def test_prefill_killed_decode_recomputes_then_reconnects(servers, failure_report):
    """kill -9 of the prefill node mid-request: decode recomputes (correct tokens) within the bound and its
    slots return; the restarted prefill (new incarnation) is accepted by the decode node without a restart.

    The prefill's engine is frozen before the legs are sent and killed while still frozen, so the kill always
    finds the request inside the node: a bare sleep before the kill let a fast machine answer first."""
    body = {"model": "tiny", "prompt": random_token_prompt(1500, seed=77), "max_tokens": 8, "temperature": 0}
    want = text_of(post(servers["agg"].url, "/v1/completions", body)[1])
    tid = uuid.uuid4().hex
    pre_body = dict(body, max_tokens=1, kv_transfer_params={"kvbridge": {"transfer_id": tid,
                                                                         "push_to": servers["decode"].handshake}})
    dec_body = dict(body, kv_transfer_params={"kvbridge": {"transfer_id": tid, "receive": True}})
    try:
        with cf.ThreadPoolExecutor(2) as ex:
            freeze_engine(servers["prefill"])
            t0 = time.monotonic()
            pre = ex.submit(post, servers["prefill"].url, "/v1/completions", pre_body)
            dec_fut = ex.submit(post, servers["decode"].url, "/v1/completions", dec_body)
            time.sleep(0.5)  # the API server (not frozen) reads the request and queues it for its engine
            servers["prefill"].kill9()
            dec = dec_fut.result()
            with pytest.raises(requests.RequestException):
                pre.result()  # the prefill leg dies with its node
        took = time.monotonic() - t0
        assert dec[0] == 200 and text_of(dec[1]) == want
        assert took < 4.0 + 5.0, f"took {took:.1f}s; bound is load_timeout_s (4) + 5"
        wait_kv_free(servers["decode"].url)
    finally:
        t_restart = time.monotonic()
        servers["prefill"].start()  # later tests share this node
        servers["prefill"].wait_ready()
    before = pool_status(servers["decode"].handshake).counters.get("transfers_scattered", 0)
    pre, dec = pd_request(servers, "/v1/completions", body)
    assert pre[0] == 200 and dec[0] == 200 and text_of(dec[1]) == want
    assert pool_status(servers["decode"].handshake).counters["transfers_scattered"] == before + 1
    failure_report("kill -9 prefill with the request in its (frozen) engine", "decode recomputed, correct tokens; "
                   "restarted prefill (new incarnation) accepted without a decode restart", took, time.monotonic() - t_restart,
                   "none: decode slots full, decode vLLM blocks 0 % used")


@pytest.fixture(scope="module")
def decode_fail_policy(tiny_model):
    s = start_vllm("decode-failpolicy", "decode", {"load_timeout_s": 2.0, "num_slots": 4}, policy="fail")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_fail_policy_gives_a_clean_error_in_bounded_time(servers, decode_fail_policy, failure_report):
    body = {"model": "tiny", "prompt": random_token_prompt(300, seed=9), "max_tokens": 8, "temperature": 0,
            "kv_transfer_params": {"kvbridge": {"transfer_id": uuid.uuid4().hex, "receive": True}}}
    t0 = time.monotonic()
    r = requests.post(decode_fail_policy.url + "/v1/completions", json=body, timeout=60)
    took = time.monotonic() - t0
    assert took < 2.0 + 5.0
    assert r.status_code >= 400 or r.json()["choices"][0]["finish_reason"] == "error", r.text
    ok = requests.post(decode_fail_policy.url + "/v1/completions",
                       json={"model": "tiny", "prompt": "still serving", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
    st = pool_status(decode_fail_policy.handshake)
    assert st.free == st.total and st.counters.get("transfers_expired") == 1
    failure_report("KV never arrives, policy=fail", f"clean error (HTTP {r.status_code}), server keeps serving",
                   took, None, "none: slots full")


def read_until(proc: subprocess.Popen, prefix: str) -> str:
    """The helper's next line starting with `prefix` (NIXL logs to stdout too)."""
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"producer helper exited before printing {prefix!r}")


def test_lease_expiring_mid_transfer_never_serves_partial_or_reused_slots(servers, failure_report):
    """The race, built on purpose: a producer writes chunk 0 of 2, then freezes (SIGSTOP) past its lease.
    The decode request waiting on it must recompute (correct tokens); the expired slots rest (its producer
    said nothing in time: they wait for its fence) while real transfers run beside them; when it wakes (SIGCONT)
    it gives up, and its fence frees them: every answer stays correct and the pool comes back full."""
    dec_url, hs = servers["decode"].url, servers["decode"].handshake
    body = {"model": "tiny", "prompt": random_token_prompt(400, seed=88), "max_tokens": 8, "temperature": 0}
    want = text_of(post(servers["agg"].url, "/v1/completions", body)[1])
    tid = uuid.uuid4().hex
    before = pool_status(hs)
    spec = TransferSpec.for_prompt(tid, body["prompt"])
    proc = subprocess.Popen([sys.executable, "-m", "tests.producer_proc", hs, spec.key, str(spec.num_tokens),
                             spec.token_hash, model_fingerprint(str(MODEL_DIR)), "1.5"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert read_until(proc, "begun") == "begun"
        with cf.ThreadPoolExecutor(8) as ex:
            dec = ex.submit(post, dec_url, "/v1/completions",
                            dict(body, kv_transfer_params={"kvbridge": {"transfer_id": tid, "receive": True}}))
            proc.stdin.write("stage 0\n")
            proc.stdin.flush()
            assert read_until(proc, "staged") == "staged True"
            wait_for(lambda: pool_status(hs).counters.get("chunks_received", 0)
                     != before.counters.get("chunks_received", 0), 5, interval=0.02, what="chunk 0 arriving")
            os.kill(proc.pid, signal.SIGSTOP)
            t_stop = time.monotonic()
            status, reply = dec.result(timeout=30)
            detect = time.monotonic() - t_stop
            assert status == 200 and text_of(reply) == want, "decode must recompute, not use chunk 0 alone"
            assert pool_status(hs).expired_total > before.expired_total, "the frozen producer's lease should expire"

            time.sleep(0.6)  # past quarantine_s: the expired slots still rest (no fence from the frozen producer)
            others = [{"model": "tiny", "prompt": random_token_prompt(500, seed=890 + i), "max_tokens": 8,
                       "temperature": 0} for i in range(6)]
            wants = list(ex.map(lambda b: text_of(post(servers["agg"].url, "/v1/completions", b)[1]), others))
            running = [ex.submit(pd_request, servers, "/v1/completions", b) for b in others]
            time.sleep(0.05)
            os.kill(proc.pid, signal.SIGCONT)  # wakes while those transfers use the reused slots
            proc.stdin.write("stage 1\nwait\n")
            proc.stdin.flush()
            for f, w in zip(running, wants):
                pre, d = f.result(timeout=60)
                assert pre[0] == 200 and d[0] == 200 and text_of(d[1]) == w
        final = read_until(proc, "final")
        assert final.startswith("final FAILED"), f"the woken producer must give up, not finish: {final}"
        proc.communicate(timeout=15)  # it closes, driving its fence out: killed, its slots would rest 30 s more
        wait_for(lambda: pool_status(hs).counters.get("fences_received", 0) > before.counters.get("fences_received", 0),
                 5, interval=0.05, what="the woken producer's fence")
        failure_report("lease expires mid-transfer (producer SIGSTOPped after chunk 0 of 2)",
                       "decode recomputed (correct); expired slots rested until the woken producer's fence while "
                       f"6 PD requests ran, all correct; woken producer gave up ({final[6:]})", detect, None,
                       "none: decode slots full")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(10)

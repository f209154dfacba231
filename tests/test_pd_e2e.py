"""PD through real vLLM: prefill (kv_producer) pushes, decode (kv_consumer) receives."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time
import uuid

import pytest
import torch

from launch.local_servers import MODEL_DIR, free_port
from launch.polling import wait_for
from launch.tiny_prompts import random_token_prompt, random_words
from pd.prefix_store import model_fingerprint
from tests.pd_client import connector_metrics, pd_request, pool_status, post, source_tokens, text_of, wait_producer_idle
from tests.producer_proc import TINY
from transfer import wire
from transfer.control_request import ask
from transfer.identity import TransferSpec
from transfer.producer import Producer, ProducerSettings
from transfer.states import State

pytestmark = pytest.mark.usefixtures("decode_pool_full_after")
MAX_TOKENS = 12


def reference(servers, path: str, body: dict) -> str:
    code, reply = post(servers["agg"].url, path, body)
    assert code == 200, reply
    return text_of(reply)


def chunks_staged(server) -> dict[str, float]:
    """The prefill node's count of chunks handed to its push thread, by how: during the forward or after it."""
    m = connector_metrics(server)
    return {how: m.get(f'kvbridge_producer_chunks_staged_total{{how="{how}"}}', 0.0) for how in ("layers", "whole")}


@pytest.mark.parametrize("n", [1, 2, 127, 128, 129, 255, 256, 257, 1000])
def test_completion_tokens_equal_aggregated(servers, n):
    body = {"model": "tiny", "prompt": random_token_prompt(n, seed=n), "max_tokens": MAX_TOKENS, "temperature": 0}
    want = reference(servers, "/v1/completions", body)
    before_src = source_tokens(servers["decode"].url)
    before = pool_status(servers["decode"].handshake).counters
    staged_before = chunks_staged(servers["prefill"])
    pre, dec = pd_request(servers, "/v1/completions", body)
    assert pre[0] == 200 and dec[0] == 200, (pre, dec)
    assert text_of(dec[1]) == want
    staged = {how: count - staged_before[how] for how, count in chunks_staged(servers["prefill"]).items()}
    if n > 1:  # the chunks left during the forward that computed them, a group of layers at a time
        assert staged["layers"] >= 1 and staged["whole"] == 0, staged
    assert dec[1]["usage"]["prompt_tokens"] == n and dec[1]["usage"]["completion_tokens"] == MAX_TOKENS
    # The KV was really used: the connector scattered exactly the prompt's tokens and vLLM counts every
    # prompt token as transferred, none computed from scratch (a 1-token prompt is the exception: vLLM
    # always recomputes the last prompt token, which there is the whole prompt).
    after_src = source_tokens(servers["decode"].url)
    transferred = n if n > 1 else 0
    assert after_src["external_kv_transfer"] - before_src["external_kv_transfer"] == transferred
    assert after_src["local_compute"] - before_src["local_compute"] == n - transferred
    after = pool_status(servers["decode"].handshake).counters
    assert after["tokens_scattered"] - before.get("tokens_scattered", 0) == n


@pytest.mark.parametrize("words", [3, 90, 400])
def test_chat_tokens_equal_aggregated(servers, words):
    body = {"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": random_words(words, seed=words)}],
            "max_tokens": MAX_TOKENS, "temperature": 0}
    want = reference(servers, "/v1/chat/completions", body)
    pre, dec = pd_request(servers, "/v1/chat/completions", body)
    assert pre[0] == 200 and dec[0] == 200, (pre, dec)
    assert text_of(dec[1]) == want


def test_a_second_chat_turn_pushes_only_what_the_decode_node_lacks(servers):
    """Turn 2 extends turn 1: the decode node's prefix cache holds turn 1's whole blocks (4 x 128 tokens, 2
    chunks), so the producer pushes only the chunks after them, and the answers still equal aggregated. The
    decode leg goes first: the consumer learns what its request holds when the request is scheduled, and a
    grant can skip only what it knows at the producer's first ALLOC."""
    turn1 = random_token_prompt(600, seed=4242)
    moved = []
    for prompt in (turn1, turn1 + random_token_prompt(300, seed=4243)):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        want = reference(servers, "/v1/completions", body)
        before = pool_status(servers["decode"].handshake).counters.get("bytes_received", 0)
        pre, dec = pd_request(servers, "/v1/completions", body, prefill_after_s=0.5)
        assert pre[0] == 200 and dec[0] == 200, (pre, dec)
        assert text_of(dec[1]) == want
        moved.append(pool_status(servers["decode"].handshake).counters["bytes_received"] - before)
    print(f"bytes pushed: turn 1 (600 tokens) {moved[0]}, turn 2 (900 tokens) {moved[1]}")
    assert moved[0] == TINY.chunk_bytes(600 + 40)  # whole blocks: 5 x 128 tokens
    assert moved[1] == TINY.chunk_bytes(900 + 124 - 512)  # blocks 4..7 of 8: the decode holds the first 4


def test_concurrent_requests_all_match(servers):
    bodies = [{"model": "tiny", "prompt": random_token_prompt(n, seed=100 + n), "max_tokens": MAX_TOKENS,
               "temperature": 0} for n in (50, 130, 300, 520, 700, 900)]
    with cf.ThreadPoolExecutor(len(bodies)) as ex:
        wants = list(ex.map(lambda b: reference(servers, "/v1/completions", b), bodies))
        got = list(ex.map(lambda b: pd_request(servers, "/v1/completions", b), bodies))
    for (pre, dec), want in zip(got, wants):
        assert pre[0] == 200 and dec[0] == 200
        assert text_of(dec[1]) == want


def test_corrupted_kv_changes_the_output(servers):
    """A producer pushes random bytes under the request's honest key: decode must use them (and so differ)."""
    n = 300
    body = {"model": "tiny", "prompt": random_token_prompt(n, seed=7), "max_tokens": MAX_TOKENS, "temperature": 0}
    want = reference(servers, "/v1/completions", body)
    rogue = Producer(TINY.model_copy(update={"weights_fingerprint": model_fingerprint(str(MODEL_DIR))}), 256,
                     ProducerSettings(producer_id=f"rogue-{uuid.uuid4().hex[:8]}"))
    tid = uuid.uuid4().hex
    spec = TransferSpec.for_prompt(tid, body["prompt"])
    try:
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(pd_request, servers, "/v1/completions", body, prefill=False, transfer_id=tid)
            handle = rogue.begin(spec, servers["decode"].handshake)
            for chunk in range(rogue.geometry.n_chunks(n)):
                nb = rogue.geometry.chunk_nbytes(n, chunk)
                # Finite values: NaN bytes left in a freed block poison later requests on vLLM's CPU attention.
                assert rogue.stage(handle, chunk, lambda v, nb=nb: v[:nb].copy_(
                    torch.randn(nb // 4).view(torch.uint8)).numel())
            done = wait_for(rogue.take_finished, 30, interval=0.05, what="the rogue push finishing")
            assert done[0].state == State.SENT
            _, dec = fut.result(timeout=60)
        assert dec[0] == 200
        assert text_of(dec[1]) != want
    finally:
        rogue.close()


def test_kv_that_never_arrives_is_recomputed(servers, failure_report):
    body = {"model": "tiny", "prompt": random_token_prompt(200, seed=11), "max_tokens": MAX_TOKENS,
            "temperature": 0}
    want = reference(servers, "/v1/completions", body)
    t0 = time.monotonic()
    _, dec = pd_request(servers, "/v1/completions", body, prefill=False)
    took = time.monotonic() - t0
    assert dec[0] == 200 and text_of(dec[1]) == want
    assert took < 4.0 + 5.0, f"recompute took {took:.1f}s, bound is load_timeout_s + 5s"
    failure_report("prefill never pushes (policy=recompute)", "decode recomputed after load_timeout_s=4, correct "
                   "tokens", took, None, "none: slots full")


def test_unreachable_consumer_falls_back_to_recompute(servers, failure_report):
    body = {"model": "tiny", "prompt": random_token_prompt(200, seed=12), "max_tokens": MAX_TOKENS,
            "temperature": 0}
    want = reference(servers, "/v1/completions", body)
    t0 = time.monotonic()
    tid = uuid.uuid4().hex
    # unnamed: the prefill node's first contact, if this test is its first, would wait handshake_grace_s (4 s here)
    pre, dec = pd_request(servers, "/v1/completions", body, push_to=f"127.0.0.1:{free_port()}", transfer_id=tid,
                          named=False)
    took = time.monotonic() - t0
    assert pre[0] == 200, pre  # the prefill leg itself succeeds; its push fails and is logged
    assert dec[0] == 200 and text_of(dec[1]) == want
    # told that the prefill answered (as the router does), the decode gave up on the silent producer after
    # no_show_s (0.5 s here: no producer greeted it lately), not after load_timeout_s (4 s here)
    trace = asyncio.run(ask(servers["decode"].handshake, wire.TraceQuery(rid=1, transfer_id=tid), 5.0))
    assert trace.state == "EXPIRED" and "never reached this node" in trace.reason, trace
    assert took < 4.0, f"fell back after {took:.1f}s"
    cleanup = wait_producer_idle(servers["prefill"])
    failure_report("consumer unreachable (prefill pushes to a dead address)", "prefill answered, the router told "
                   "the decode; the decode recomputed no_show_s=0.5 s after, correct; the transfer failed and released "
                   "its staging", took, cleanup, "none: prefill staging full")

"""A producer that lies to a real decode node: the transfer is refused and the request is still right.

The producer here is kvbridge's own push engine in the test process, with the tiny model's layout and
weights, sending random bytes under the decode request's key: with another prompt's token hash, or
with a chunk whose byte count is not what its index must hold.
"""
from __future__ import annotations

import concurrent.futures as cf
import uuid

import pytest
import torch

from launch.local_servers import MODEL_DIR
from launch.polling import wait_for
from launch.tiny_prompts import random_token_prompt
from pd.prefix_store import model_fingerprint
from tests.pd_client import pool_status, post, text_of
from tests.test_fence_delivery import send_fence
from tests.producer_proc import TINY
from transfer.identity import TransferSpec
from transfer.notice import ChunkNotice
from transfer.producer import Producer, ProducerSettings

pytestmark = pytest.mark.usefixtures("decode_pool_full_after")


@pytest.fixture
def liar():
    p = Producer(TINY.model_copy(update={"weights_fingerprint": model_fingerprint(str(MODEL_DIR))}), 256,
                 ProducerSettings(producer_id=f"liar-{uuid.uuid4().hex[:8]}"))
    yield p
    p.close()


def decode_leg(servers, body: dict, tid: str) -> cf.Future:
    ex = cf.ThreadPoolExecutor(1)
    return ex.submit(post, servers["decode"].url, "/v1/completions",
                     dict(body, kv_transfer_params={"kvbridge": {"transfer_id": tid, "receive": True}}))


def counters(servers) -> dict[str, int]:
    return pool_status(servers["decode"].handshake).counters


def test_another_prompts_token_hash_is_refused_and_the_request_recomputes(servers, liar):
    body = {"model": "tiny", "prompt": random_token_prompt(400, seed=6400), "max_tokens": 8, "temperature": 0}
    want = text_of(post(servers["agg"].url, "/v1/completions", body)[1])
    tid, before = uuid.uuid4().hex, counters(servers)
    honest = TransferSpec.for_prompt(tid, body["prompt"])
    lie = TransferSpec(honest.key, honest.num_tokens, TransferSpec.for_prompt(tid, [1, 2, 3]).token_hash)
    fut = decode_leg(servers, body, tid)
    handle = liar.begin(lie, servers["decode"].handshake)
    for c in range(liar.geometry.n_chunks(lie.num_tokens)):
        n = liar.geometry.chunk_nbytes(lie.num_tokens, c)
        liar.stage(handle, c, lambda v, n=n: v[:n].copy_(torch.randint(0, 256, (n,), dtype=torch.uint8)).numel())
    status, reply = fut.result(timeout=60)
    assert status == 200 and text_of(reply) == want
    after = counters(servers)
    assert after.get("transfers_scattered", 0) == before.get("transfers_scattered", 0)
    assert after.get("transfers_failed", 0) == before.get("transfers_failed", 0) + 1


def test_a_chunk_with_the_wrong_byte_count_is_refused_and_the_request_recomputes(servers, liar):
    body = {"model": "tiny", "prompt": random_token_prompt(300, seed=6401), "max_tokens": 8, "temperature": 0}
    want = text_of(post(servers["agg"].url, "/v1/completions", body)[1])
    tid, before = uuid.uuid4().hex, counters(servers)
    spec = TransferSpec.for_prompt(tid, body["prompt"])
    fut = decode_leg(servers, body, tid)
    link = liar.link(servers["decode"].handshake)
    grant = link.alloc(spec, 5.0)
    w, short = link.welcome, liar.geometry.chunk_nbytes(spec.num_tokens, 0) - 4096
    notice = ChunkNotice(transfer_id=spec.key, chunk=0, epoch=grant.epoch, incarnation=liar.incarnation, nbytes=short)
    h = liar.agent.write(liar.staging.region, [(0, grant.offsets[0], short)], w.agent_name, w.mem_type, w.dev_id,
                         notice.encode())
    wait_for(lambda: liar.agent.poll(h) == "DONE", 5, 0.01, "short write done")
    liar.agent.release(h)
    status, reply = fut.result(timeout=60)
    assert status == 200 and text_of(reply) == want
    after = counters(servers)
    assert after.get("transfers_scattered", 0) == before.get("transfers_scattered", 0)
    assert after.get("transfers_failed", 0) == before.get("transfers_failed", 0) + 1
    # a producer that never fences holds the lease's slots for fence_timeout_s; this one ends its job as ours do
    assert pool_status(servers["decode"].handshake).quarantined >= 1
    send_fence(liar, w, spec.key, grant.epoch)

"""A deployment with a secret, through real vLLM: prefill, decode and the router all read it from the
environment. The router's signed prefill legs move KV; a client talking to the prefill port directly
cannot make it push anywhere and its request is still answered; no process shows the secret."""
from __future__ import annotations

import asyncio
import secrets
import subprocess
import uuid

import pytest
import requests
import yaml
import zmq

from launch.local_servers import LOG_DIR, SERVED_MODEL, free_port, start_vllm
from launch.servers import RouterServer
from launch.tiny_prompts import random_token_prompt
from router.config import RouterConfig
from tests.pd_client import assert_kv_arrived, pool_status, post, text_of
from transfer import control_auth, wire
from transfer.control_auth import Credential
from transfer.control_request import ask
from transfer.push_token import push_key, sign

SECRET = "kvb-e2e-" + secrets.token_hex(16)
ENV = {"KVBRIDGE_SECRET": SECRET}


@pytest.fixture(scope="module")
def secure(tiny_model):
    nodes = {"decode": start_vllm("sec-decode", "decode", {"load_timeout_s": 2.0, "num_slots": 16}, env=ENV),
             "prefill": start_vllm("sec-prefill", "prefill", {"lease_ttl_s": 3.0}, env=ENV,
                                   vllm_args=("--no-enable-prefix-caching",))}
    router = None
    try:
        for s in nodes.values():
            s.wait_ready()
        cfg = RouterConfig(port=free_port(), model=SERVED_MODEL, health_interval_s=0.5,
                           prefill=[{"name": "sec-prefill", "url": nodes["prefill"].url}],
                           decode=[{"name": "sec-decode", "url": nodes["decode"].url,
                                    "kv_address": nodes["decode"].handshake}])
        path = LOG_DIR / f"router-sec-{cfg.port}.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
        router = RouterServer(path, LOG_DIR, name="sec-router", env=ENV)
        router.start()
        router.wait_ready(60)
        yield dict(nodes, router=router)
    finally:
        for s in [router, *nodes.values()]:
            if s is not None:
                s.stop()


def counters(secure) -> dict[str, int]:
    return pool_status(secure["decode"].handshake, SECRET.encode()).counters


def body(seed: int) -> dict:
    return {"model": SERVED_MODEL, "prompt": random_token_prompt(300, seed=seed), "max_tokens": 8, "temperature": 0}


def test_router_legs_are_signed_and_move_kv(secure):
    b = body(9100)
    want = text_of(post(secure["decode"].url, "/v1/completions", b)[1])  # computed on the decode node alone
    before = counters(secure).get("transfers_scattered", 0)
    r = requests.post(secure["router"].url + "/v1/completions", json=b, timeout=120)
    assert r.status_code == 200 and text_of(r.json()) == want
    assert_kv_arrived(secure["router"].url, r)
    assert counters(secure).get("transfers_scattered", 0) == before + 1


def _token(kind: str, tid: str, target: str) -> str | None:
    key = push_key(SECRET.encode())
    return {"missing": None, "expired": sign(key, tid, target, -1), "tampered": sign(key, tid, "127.0.0.1:1", 60),
            "unsigned secret": sign(push_key(b"guess"), tid, target, 60)}[kind]


@pytest.mark.parametrize("kind", ["missing", "expired", "tampered", "unsigned secret"])
def test_prefill_leg_without_a_valid_token_pushes_nothing_and_is_answered(secure, kind):
    b, tid = body(9200), uuid.uuid4().hex
    want = text_of(post(secure["decode"].url, "/v1/completions", b)[1])
    trap = zmq.Context.instance().socket(zmq.ROUTER)  # where a hostile client wants the KV to go
    trap.setsockopt(zmq.LINGER, 0)
    port = trap.bind_to_random_port("tcp://127.0.0.1")
    try:
        for target in (secure["decode"].handshake, f"127.0.0.1:{port}"):
            token = _token(kind, tid, target)
            params = {"transfer_id": tid, "push_to": target, **({"push_token": token} if token else {})}
            status, reply = post(secure["prefill"].url, "/v1/completions",
                                 dict(b, max_tokens=1, kv_transfer_params={"kvbridge": params}))
            assert status == 200, reply
            assert reply["kv_transfer_params"]["kvbridge"]["push_refused"], reply
        assert not trap.poll(2000), "the prefill node contacted the target a client named"
    finally:
        trap.close(0)
    before = counters(secure)
    status, reply = post(secure["decode"].url, "/v1/completions",
                         dict(b, kv_transfer_params={"kvbridge": {"transfer_id": tid, "receive": True}}))
    assert status == 200 and text_of(reply) == want, "recomputed by policy"
    after = counters(secure)
    assert after.get("transfers_scattered", 0) == before.get("transfers_scattered", 0)
    assert after.get("transfers_expired", 0) == before.get("transfers_expired", 0) + 1


def test_unauthenticated_peer_is_refused_and_the_decode_node_keeps_serving(secure):
    reply = asyncio.run(ask(secure["decode"].handshake, wire.Stats(), 3.0, Credential("router", None)))
    assert reply == wire.Error(code="unauthenticated", message="refused")
    assert isinstance(asyncio.run(ask(secure["decode"].handshake, wire.Stats(), 3.0,
                                      Credential("router", SECRET.encode()))), wire.PoolStatus)
    frame, _ = Credential("producer/x", b"guess").seal(wire.encode(wire.Stats()))
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://{secure['decode'].handshake}")
    s.send(frame)
    assert s.poll(3000)
    raw = s.recv()
    s.close(0)
    assert b"agent" not in raw and wire.decode_reply(control_auth.parse(raw)[3]).code == "unauthenticated"


def test_no_process_and_no_log_shows_the_secret(secure):
    ps = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True, check=True).stdout
    assert str(secure["decode"].proc.pid) in ps and "kv_consumer" in ps, "ps shows the nodes' command lines"
    assert SECRET not in ps
    for name in ("sec-decode", "sec-prefill", "sec-router"):
        assert SECRET not in (LOG_DIR / f"{name}.log").read_text(errors="replace"), name

"""Signed push targets: the producer pushes only where the router signed for that transfer, or to an
allow-listed consumer; a client that names its own target on the prefill port gets nothing pushed."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from pd.scheduler_side import PARAMS_KEY, SchedulerSide
from router.leg_bodies import prefill_body
from transfer.push_token import PushPolicy, push_key, sign

KEY = push_key(b"deployment-secret")
TARGET = "10.0.0.7:5600"
POLICY = PushPolicy(KEY)


def test_a_token_is_valid_for_its_transfer_target_and_lifetime_only():
    token = sign(KEY, "t1", TARGET, 30)
    assert POLICY.refusal("t1", TARGET, token) == ""
    assert "does not match" in POLICY.refusal("t2", TARGET, token)
    assert "does not match" in POLICY.refusal("t1", "6.6.6.6:5600", token)
    assert "does not match" in POLICY.refusal("t1", TARGET, sign(push_key(b"guess"), "t1", TARGET, 30))
    exp, mac = token.split(".")
    assert "does not match" in POLICY.refusal("t1", TARGET, f"{int(exp) + 60_000}.{mac}")  # stretched expiry
    assert "does not match" in POLICY.refusal("t1", TARGET, f"{exp}.{'0' * 64}")
    for junk in ("1.\u00e9", "\u00b2.ab", ".", "9" * 150):  # not even ASCII, odd digits: refused, no crash
        assert "does not match" in POLICY.refusal("t1", TARGET, junk)
    assert "no push token" in POLICY.refusal("t1", TARGET, "")
    assert "expired" in POLICY.refusal("t1", TARGET, token, now=time.time() + 31)
    assert "no push token" in POLICY.refusal("t1", TARGET, None)


def test_allow_list_and_secretless_loopback():
    assert PushPolicy(KEY, frozenset({TARGET})).refusal("t", TARGET, None) == ""
    assert PushPolicy().refusal("t", "127.0.0.1:5600", None) == ""
    assert "not loopback" in PushPolicy().refusal("t", TARGET, None)
    assert "not loopback" in PushPolicy().refusal("t", "attacker.example:5600", None)
    assert PushPolicy(insecure=True).refusal("t", TARGET, None) == ""


def test_router_signs_each_prefill_leg_and_drops_the_clients_own_params():
    body = {"prompt": "hi", "kv_transfer_params": {"kvbridge": {"push_to": "6.6.6.6:1"}}}
    leg = prefill_body(body, "tid", TARGET, KEY, 30)["kv_transfer_params"][PARAMS_KEY]
    assert leg["push_to"] == TARGET and POLICY.refusal("tid", TARGET, leg["push_token"]) == ""
    assert "push_token" not in prefill_body(body, "tid", "127.0.0.1:1")["kv_transfer_params"][PARAMS_KEY]


def request(params: dict) -> SimpleNamespace:
    return SimpleNamespace(request_id="r1", prompt_token_ids=list(range(300)), kv_transfer_params={PARAMS_KEY: params},
                           num_computed_tokens=0, num_preemptions=0)


@pytest.mark.parametrize("token,why", [
    (None, "no push token"),
    (sign(KEY, "t1", TARGET, -1), "expired"),
    (sign(KEY, "t1", "127.0.0.1:9", 30), "does not match"),
])
def test_producer_scheduler_pushes_nothing_without_a_valid_token_and_says_why(token, why):
    side = SchedulerSide(16, is_producer=True, is_consumer=False, push_policy=POLICY)
    req = request({"transfer_id": "t1", "push_to": TARGET, **({"push_token": token} if token else {})})
    side.update_state_after_alloc(req, None, 0)
    assert side._outgoing == {}, "nothing is pushed, the request is computed as usual"
    _, answer = side.request_finished(req, [])
    assert why in answer[PARAMS_KEY]["push_refused"]


def test_producer_scheduler_pushes_with_a_valid_token():
    side = SchedulerSide(16, is_producer=True, is_consumer=False, push_policy=POLICY)
    req = request({"transfer_id": "t1", "push_to": TARGET, "push_token": sign(KEY, "t1", TARGET, 30)})
    side.update_state_after_alloc(req, None, 0)
    assert side._outgoing["r1"].consumer == TARGET
    _, answer = side.request_finished(req, [])
    assert "push_refused" not in answer[PARAMS_KEY]


@pytest.mark.parametrize("push_to", ["127.0.0.1:abc", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "localhost:\u0665\u0666"])
def test_a_push_target_that_is_not_host_port_is_refused_for_its_request_alone(push_to):
    """Loopback by its host, but a TP rank > 0 derives its own port from it: refused where the request is read,
    it is that request's answer, not a failure inside the engine."""
    assert "not host:port" in PushPolicy().refusal("t", push_to, None)
    side = SchedulerSide(16, is_producer=True, is_consumer=False, push_policy=PushPolicy())
    req = request({"transfer_id": "t1", "push_to": push_to})
    side.update_state_after_alloc(req, None, 0)
    assert side._outgoing == {}
    _, answer = side.request_finished(req, [])
    assert "not host:port" in answer[PARAMS_KEY]["push_refused"]

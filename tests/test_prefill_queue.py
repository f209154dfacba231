"""A push request waiting in the prefill's queue is announced to its consumer (at once, then every
`every_s`) until it is scheduled or finishes; a request whose push target is refused is never announced."""
from __future__ import annotations

from types import SimpleNamespace

from pd.prefill_queue import PrefillQueue
from pd.scheduler_side import SchedulerSide
from tests.test_push_token import KEY, POLICY, TARGET, request
from transfer.identity import TransferSpec
from transfer.push_token import sign

IDLE_STEP = SimpleNamespace(total_num_scheduled_tokens=0, preempted_req_ids=None, scheduled_new_reqs=[],
                            scheduled_cached_reqs=SimpleNamespace(req_ids=[]))


def test_a_queued_request_is_announced_at_once_then_every_interval_until_it_leaves():
    now = [100.0]
    q = PrefillQueue(every_s=1.0, clock=lambda: now[0])
    q.arrived("r1", "k1", "c:1")
    assert q.due() == [("k1", "c:1")]
    now[0] += 0.5
    assert q.due() == []
    now[0] += 0.5
    assert q.due() == [("k1", "c:1")]
    q.left("r1")
    now[0] += 5
    assert q.due() == []


def test_the_scheduler_announces_a_queued_push_until_it_is_scheduled():
    side = SchedulerSide(16, is_producer=True, is_consumer=False, push_policy=POLICY)
    req = request({"transfer_id": "t1", "push_to": TARGET, "push_token": sign(KEY, "t1", TARGET, 30)})
    side.on_new_request(req)
    key = TransferSpec.for_prompt("t1", req.prompt_token_ids).key
    assert side.build_connector_meta(IDLE_STEP).pending == [(key, TARGET)]
    assert side.build_connector_meta(IDLE_STEP).pending == []  # not due again yet
    side.update_state_after_alloc(req, None, 0)  # scheduled: its push's own messages are its signs of life now
    side._queue.every_s = 0.0
    assert side.build_connector_meta(IDLE_STEP).pending == []


def test_a_refused_push_target_is_never_announced():
    side = SchedulerSide(16, is_producer=True, is_consumer=False, push_policy=POLICY)
    side.on_new_request(request({"transfer_id": "t1", "push_to": TARGET}))  # no token
    assert side.build_connector_meta(IDLE_STEP).pending == []

"""A preempted request's earlier attempt ends when vLLM frees its blocks, and the request starts anew when
resumed: its push ends and a new attempt pushes, its store hit is asked again. vLLM reports a preemption in
the next SchedulerOutput (`preempted_req_ids`); a prefix-cache reset with running requests preempts outside
schedule(), and the next schedule() may resume the request in the very step that reports it. And a decode
request whose load vLLM overrode to nothing discards its transfer, so it does not hold decode slots."""
from __future__ import annotations

from types import SimpleNamespace

from pd.scheduler_side import SchedulerSide
from tests.test_push_token import KEY, POLICY, TARGET, request
from tests.test_store_path import store_scheduler
from transfer.identity import TransferSpec
from transfer.push_token import sign

BLOCKS = SimpleNamespace(get_block_ids=lambda: [list(range(19))])


def step(preempted: set[str] = frozenset(), scheduled: tuple[str, ...] = (),
         finished: set[str] = frozenset()) -> SimpleNamespace:
    """A SchedulerOutput where `scheduled` requests start from token 0 (16 tokens each)."""
    new = [SimpleNamespace(req_id=r, block_ids=(list(range(19)),), num_computed_tokens=0) for r in scheduled]
    return SimpleNamespace(total_num_scheduled_tokens=16 * len(new), preempted_req_ids=set(preempted),
                           finished_req_ids=set(finished),
                           scheduled_new_reqs=new, num_scheduled_tokens={r: 16 for r in scheduled},
                           scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[]))


def schedule(side: SchedulerSide, req: SimpleNamespace, external: int = 0) -> None:
    side.get_num_new_matched_tokens(req, 0)
    side.update_state_after_alloc(req, BLOCKS, external)


def pusher() -> tuple[SchedulerSide, SimpleNamespace]:
    side = SchedulerSide(16, is_producer=True, is_consumer=False, push_policy=POLICY)
    req = request({"transfer_id": "t1", "push_to": TARGET, "push_token": sign(KEY, "t1", TARGET, 30)})
    schedule(side, req)
    assert [t.spec.attempt for t in side.build_connector_meta(step(scheduled=("r1",))).outgoing] == [0]
    return side, req


def test_a_request_preempted_outside_schedule_and_resumed_in_that_step_ends_its_push_and_pushes_anew():
    side, req = pusher()
    req.num_preemptions = 1  # a prefix-cache reset preempted it; this schedule() resumes it at once
    schedule(side, req)
    meta = side.build_connector_meta(step(preempted={"r1"}, scheduled=("r1",)))
    assert meta.aborts == ["r1"], "the old attempt's push ends (the worker reads aborts before new pushes)"
    assert [t.spec.attempt for t in meta.outgoing] == [1], "the resumed request pushes as a new attempt"


def test_a_request_preempted_in_schedule_ends_its_push_then_pushes_anew_once_resumed():
    side, req = pusher()
    req.num_preemptions = 1
    meta = side.build_connector_meta(step(preempted={"r1"}))
    assert meta.aborts == ["r1"] and meta.outgoing == []
    schedule(side, req)  # resumed in a later step
    meta = side.build_connector_meta(step(scheduled=("r1",)))
    assert meta.aborts == [] and [t.spec.attempt for t in meta.outgoing] == [1]


def test_a_request_preempted_outside_schedule_then_aborted_leaves_nothing_behind():
    """The reset's preemption is reported in the next step's output, after the client's abort in between."""
    side, req = pusher()
    req.num_preemptions = 1
    side.request_finished(req, [])
    meta = side.build_connector_meta(step(preempted={"r1"}, finished={"r1"}))
    assert meta.aborts == ["r1"], "the push ends once, at the abort"
    assert side._attempts == {} and side._outgoing == {}


def test_a_store_hit_made_before_a_same_step_resume_is_asked_again_and_loaded():
    """The first attempt's hit was vLLM's own prefix cache (no load from the store); the reset emptied that
    cache, so the resumed request must load the chunks from the store, not wait for a load nobody made."""
    side, client = store_scheduler()
    req = SimpleNamespace(request_id="r1", prompt_token_ids=list(range(13)), kv_transfer_params=None,
                          num_preemptions=0, num_computed_tokens=0)
    assert side.get_num_new_matched_tokens(req, 8) == (0, False)  # vLLM's own cache held those 8 tokens
    side.update_state_after_alloc(req, BLOCKS, 0)
    side.build_connector_meta(step(scheduled=("r1",)))
    req.num_preemptions = 1
    assert side.get_num_new_matched_tokens(req, 0) == (8, True) and client.asked == 2
    side.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: ([0, 1, 2, 3],)), 8)
    meta = side.build_connector_meta(step(preempted={"r1"}))
    assert [t.keys for t in meta.store_loads] == [client.keys(list(range(13)))[:2]]


def test_a_decode_request_vllm_loads_nothing_for_discards_its_transfer():
    """A request that skips the prefix cache (one asking for prompt logprobs) computes its prompt: vLLM
    overrides the connector's hit to 0, and the transfer its prefill pushes would hold decode slots unread."""
    side = SchedulerSide(16, is_producer=False, is_consumer=True)
    req = request({"transfer_id": "t1", "receive": True})
    assert side.get_num_new_matched_tokens(req, 0) == (300, True)
    side.update_state_after_alloc(req, BLOCKS, 0)
    meta = side.build_connector_meta(step(scheduled=("r1",)))
    assert meta.loads == [] and meta.discards == [TransferSpec.for_prompt("t1", req.prompt_token_ids).key]
    side.request_finished(req, [])
    assert side.build_connector_meta(step()).discards == [], "discarded once"

"""A step with nothing to move costs the engine loop one check per hook: the scheduler says so in the step's
metadata (`quiet`), the worker's hooks return at that check, and a worker with nothing in flight answers vLLM
with one shared, frozen, empty result. Anything to move makes the step not quiet."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from pd.connector import KVBridgeConnector
from pd.connector_config import ConnectorConfig
from pd.scheduler_side import SchedulerSide
from pd.step_metadata import NOTHING, QUIET, QUIET_IDLE, BridgeMetadata
from pd.worker_side import WorkerSide
from tests.test_prefill_queue import IDLE_STEP
from tests.test_push_token import request

DECODE_STEP = SimpleNamespace(total_num_scheduled_tokens=8, preempted_req_ids=None, finished_req_ids=set(),
                              scheduled_new_reqs=[],
                              scheduled_cached_reqs=SimpleNamespace(req_ids=[f"d{i}" for i in range(8)]))


def test_a_decode_step_with_nothing_to_move_is_quiet_and_one_with_a_new_load_is_not():
    side = SchedulerSide(16, is_producer=False, is_consumer=True)
    assert side.build_connector_meta(DECODE_STEP) is QUIET
    assert side.build_connector_meta(IDLE_STEP) is QUIET_IDLE, "an idle step still says it is idle"
    blocks = SimpleNamespace(get_block_ids=lambda: [list(range(19))])
    side.update_state_after_alloc(request({"transfer_id": "t1", "receive": True}), blocks, 300)
    meta = side.build_connector_meta(DECODE_STEP)
    assert not meta.quiet and [t.req_id for t in meta.loads] == ["r1"]
    assert side.build_connector_meta(DECODE_STEP) is QUIET, "the load was handed over once"


def test_a_preempted_request_makes_the_step_not_quiet_on_a_producer():
    side = SchedulerSide(16, is_producer=True, is_consumer=False)
    side._outgoing["r1"] = SimpleNamespace()
    meta = side.build_connector_meta(SimpleNamespace(**dict(vars(DECODE_STEP), preempted_req_ids={"r1"})))
    assert meta.aborts == ["r1"] and not meta.quiet


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        return lambda *args: self.calls.append(name)


@pytest.mark.parametrize("meta,called", [(QUIET, []), (BridgeMetadata(aborts=["r1"]),
                                                        ["on_bind", "start_load_kv", "wait_for_save"])])
def test_the_worker_hooks_hand_a_step_on_only_when_it_is_not_quiet(meta, called):
    conn = object.__new__(KVBridgeConnector)  # the facade alone: no engine behind it
    conn.worker_side = Recorder()
    conn.bind_connector_metadata(meta)
    conn.start_load_kv(None)
    conn.wait_for_save()
    assert conn.worker_side.calls == called


def test_a_worker_with_nothing_in_flight_answers_with_the_shared_frozen_empty_result():
    worker = WorkerSide(ConnectorConfig(), vllm_config=None, is_producer=False, is_consumer=True)
    assert worker.get_transfer_results(idle=False) is NOTHING
    with pytest.raises(AttributeError):
        NOTHING.finished_recving.add("r1")  # shared by every such step: nobody may fill it
    worker._done_recv.add("r1")  # a receive that ended: reported once, in a result of its own
    assert worker.get_transfer_results(idle=False).finished_recving == {"r1"}
    assert worker.get_transfer_results(idle=False) is NOTHING

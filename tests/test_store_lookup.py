"""The scheduler's store lookups never hold the scheduler: an answer that is late is waited for across
steps (vLLM asks again), used when it comes, and given up only after the lookup timeout."""
from __future__ import annotations

import threading
from types import SimpleNamespace

from pd.scheduler_side import SchedulerSide
from pd.store_lookup import LookupClient, LookupServer, StoreHandshake, StoreLookups
from storage.chunk_keys import chain_seed

PROMPT = list(range(13))  # 3 whole chunks of 4 tokens


class GatedStore:
    """Holds every chunk, but answers a lookup only once the test opens the gate (a worker busy elsewhere)."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def lookup(self, keys: list[str]) -> int:
        self.gate.wait(30)
        return len(keys)


def scheduler_with(server: LookupServer, timeout_s: float) -> SchedulerSide:
    side = SchedulerSide(block_size=4, is_producer=True, is_consumer=False, store_lookup_timeout_s=timeout_s)
    client = LookupClient(StoreHandshake(server.address, chain_seed("x"), 4), timeout_s)
    side._lookups = StoreLookups([client], timeout_s, poll_s=0.001)
    return side


def request(rid: str) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, prompt_token_ids=PROMPT, kv_transfer_params=None, num_preemptions=0)


def test_a_late_answer_is_waited_for_across_steps_and_used():
    store = GatedStore()
    server = LookupServer(store)
    try:
        side = scheduler_with(server, timeout_s=60)
        req = request("late")
        assert [side.get_num_new_matched_tokens(req, 0) for _ in range(3)] == [(None, False)] * 3, \
            "no answer yet: vLLM must ask again, not compute the prompt"
        store.gate.set()
        while (got := side.get_num_new_matched_tokens(req, 0)) == (None, False):
            pass
        assert got == (12, True), "the answer that came late is the one used (3 chunks held, 13 prompt tokens; loaded asynchronously)"
        assert side.get_num_new_matched_tokens(req, 0) == (12, True), "and kept for the request"
        assert side._lookups._asked == {} and side._lookups.clients[0]._asked == {}
    finally:
        store.gate.set()
        server.close()


def test_a_lookup_unanswered_past_its_timeout_is_a_miss_and_its_late_answer_is_dropped():
    store = GatedStore()
    server = LookupServer(store)
    try:
        side = scheduler_with(server, timeout_s=1e-6)
        req = request("given-up")
        assert side.get_num_new_matched_tokens(req, 0) == (0, False), "past the timeout the prompt is computed"
        side._lookups.timeout_s = 60  # the next request waits for its answer, which comes after the late one
        store.gate.set()
        second = request("next")
        while (got := side.get_num_new_matched_tokens(second, 0)) == (None, False):
            pass
        assert got == (12, True), "the next request's own answer, not the late one before it"
        client = side._lookups.clients[0]
        assert client._asked == {}, "the given-up lookup's late answer is not kept"
        side.request_finished(req, [])
        side.request_finished(second, [])
        assert side._lookups._asked == {}
    finally:
        store.gate.set()
        server.close()


def test_a_finished_request_forgets_its_unanswered_lookup():
    store = GatedStore()
    server = LookupServer(store)
    try:
        side = scheduler_with(server, timeout_s=60)
        req = request("gone")
        assert side.get_num_new_matched_tokens(req, 0) == (None, False)
        side.request_finished(req, [])
        assert side._lookups._asked == {} and side._lookups.clients[0]._asked == {}
    finally:
        store.gate.set()
        server.close()

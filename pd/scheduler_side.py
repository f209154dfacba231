"""Scheduler-side half of the connector: decides what each worker step pushes, keeps, loads or receives.

Runs inside vLLM's scheduler, so nothing here may raise on bad request input (that
would take the EngineCore down): malformed `kv_transfer_params` are logged and the
request is served without kvbridge.

Request params (set by the router):
  prefill leg  {"kvbridge": {"transfer_id": T, "push_to": "host:port", "push_token": signed by the router}}
  decode leg   {"kvbridge": {"transfer_id": T, "receive": true, "claims": n}}

A push target is used only if the producer's PushPolicy accepts it (transfer/push_token.py): a client
talking to the prefill port directly cannot make it push anywhere. A refused target is logged and
reported in the request's answer (`push_refused`); the request is computed as usual and its decode leg
follows its load-failure policy.

Each engine request's transfer is keyed by T and a hash of its own prompt tokens (transfer/identity.py),
so the engine requests of one OpenAI request (a list of prompts) never share KV; `claims` is how many
engine requests read one prompt's transfer on the decode node (`n` of parallel sampling).

With a store configured, a producer also reports the prompt's leading chunks found in the store
as external tokens, loaded asynchronously (the request waits until the worker has them in memory and
reports it as a finished receive, pd/store_loads.py), and has every new whole chunk kept. The lookup is
made once per request and its answer kept until the request finishes; until it comes (at most the
lookup timeout) vLLM is told to ask again next step (pd/store_lookup.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pd.prefill_queue import PrefillQueue
from pd.step_metadata import QUIET, QUIET_IDLE, BridgeMetadata, LoadTask, OutgoingTask, StoreLoadTask
from pd.store_lookup import LookupClient, StoreHandshake, StoreLookups
from transfer.identity import TransferSpec
from transfer.push_token import PushPolicy
from transfer.wire import MAX_CLAIMS

log = logging.getLogger("kvbridge.scheduler")
PARAMS_KEY = "kvbridge"


class BridgeParams(BaseModel):
    model_config = ConfigDict(extra="ignore")
    transfer_id: str = Field(min_length=1, max_length=200)
    push_to: str | None = Field(default=None, max_length=300)
    push_token: str | None = Field(default=None, max_length=200)
    receive: bool = False
    claims: int = Field(default=1, ge=1, le=MAX_CLAIMS)


def bridge_params(request: Any) -> BridgeParams | None:
    raw = (getattr(request, "kv_transfer_params", None) or {}).get(PARAMS_KEY)
    if raw is None:
        return None
    try:
        return BridgeParams.model_validate(raw)
    except ValidationError as e:
        log.warning("request %s: ignoring malformed kv_transfer_params.%s: %s", request.request_id, PARAMS_KEY,
                    e.errors()[0]["msg"])
        return None


def storable(request: Any) -> bool:
    """Token ids alone decide the KV only without LoRA, multimodal inputs, prompt embeddings or a cache
    salt; such requests neither use nor fill the store (their keys would need those inputs too)."""
    return not (getattr(request, "lora_request", None) or getattr(request, "mm_features", None)
                or getattr(request, "cache_salt", None) or getattr(request, "prompt_embeds", None) is not None)


class SchedulerSide:
    def __init__(self, block_size: int, is_producer: bool, is_consumer: bool,
                 store_lookup_timeout_s: float | None = None, push_policy: PushPolicy = PushPolicy()) -> None:
        self.block_size = block_size
        self.push_policy = push_policy
        # req_id -> '' (push target accepted) or why it was refused; checked once, so a preempted
        # request's later attempt is not refused for a token that expired while it waited
        self._push_checked: dict[str, str] = {}
        self.is_producer = is_producer
        self.is_consumer = is_consumer
        self.lookup_timeout_s = store_lookup_timeout_s if is_producer else None
        self._lookups: StoreLookups | None = None
        self._outgoing: dict[str, OutgoingTask] = {}
        self._new_loads: list[LoadTask] = []
        self._new_store_loads: list[StoreLoadTask] = []
        # req_id -> (chunk keys, chunks held, tokens vLLM had computed locally when it asked)
        self._store_hits: dict[str, tuple[list[str], int, int]] = {}
        # req_id -> (chunk keys, chunks held): asked once per request; vLLM asks again every step it waits
        self._store_answers: dict[str, tuple[list[str], int]] = {}
        # requests whose chunks were loaded from the store once: vLLM asks again after a failed load, and the
        # same answer would load the same missing chunk again, forever; such a request computes its prompt
        self._store_loaded: set[str] = set()
        self._lookup_times: list[tuple[str, float]] = []
        self._loading: set[str] = set()
        self._received: set[str] = set()
        # req_id -> tokens vLLM's own prefix cache held when it asked (request.num_computed_tokens is still 0
        # in update_state_after_alloc for an async load, so it cannot say which blocks to leave alone)
        self._local_hits: dict[str, int] = {}
        self._attempts: dict[str, int] = {}  # req_id -> its preemptions seen here: the attempt it pushes as
        self._resumed: set[str] = set()  # preempted outside schedule(): its attempt ended in this step already
        self._aborts: list[str] = []
        self._discards: list[str] = []
        self._queue = PrefillQueue()  # push requests not scheduled yet: announced to their consumers

    def on_new_request(self, request: Any) -> None:
        """A push request entered our queue: its consumer hears of it until it is scheduled."""
        p = bridge_params(request)
        if self.is_producer and p is not None and p.push_to is not None and self._push_allowed(request.request_id, p):
            key = TransferSpec.for_prompt(p.transfer_id, list(request.prompt_token_ids or ())).key
            self._queue.arrived(request.request_id, key, p.push_to)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        self._new_attempt(request)
        p = bridge_params(request)
        if self.is_consumer and p is not None and p.receive:
            if request.request_id in self._received:
                return 0, False
            self._local_hits[request.request_id] = num_computed_tokens
            n = len(request.prompt_token_ids or ()) - num_computed_tokens
            return (n, True) if n > 0 else (0, False)
        if self._lookups is not None:
            n = self._store_match(request, num_computed_tokens)  # None: vLLM asks again next step
            return n, bool(n)  # a hit loads asynchronously: a slow tier holds up only this request
        return 0, False

    def set_store_handshakes(self, metadata: dict[int, Any]) -> None:
        hs = [m for m in metadata.values() if isinstance(m, StoreHandshake)]
        if self.lookup_timeout_s is not None and hs:
            self._lookups = StoreLookups([LookupClient(h, self.lookup_timeout_s) for h in hs], self.lookup_timeout_s)
            log.info("store lookups go to %s", ", ".join(c.address for c in self._lookups.clients))

    def _store_match(self, request: Any, num_computed_tokens: int) -> int | None:
        if not storable(request) or request.request_id in self._store_loaded:
            return 0
        t0 = time.perf_counter()
        prompt = request.prompt_token_ids or ()
        answer = self._store_answers.get(request.request_id)
        if answer is None:
            got = self._lookups.answer(request.request_id, list(prompt))
            if got is None:
                return None
            keys, held, outcome, waited = got
            self._lookup_times.append((outcome, waited))
            answer = self._store_answers[request.request_id] = (keys, held)
        else:
            self._lookup_times.append(("cached", time.perf_counter() - t0))
        keys, held = answer
        self._store_hits[request.request_id] = (keys, held, num_computed_tokens)
        c = self._lookups.chunk_tokens
        usable = min(held, (len(prompt) - 1) // c)  # vLLM computes at least the last prompt token
        return max(0, usable * c - num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._new_attempt(request)
        rid = request.request_id
        self._queue.left(rid)
        p = bridge_params(request)
        receiving = p is not None and p.receive and self.is_consumer
        if self.is_producer and rid not in self._outgoing and not receiving:
            keys, held, local = self._store_hits.pop(rid, ([], 0, 0))
            if num_external_tokens > 0 and keys:
                c = self._lookups.chunk_tokens
                first, last = local // c, (local + num_external_tokens) // c
                self._new_store_loads.append(StoreLoadTask(rid, keys[first:last], first,
                                                           list(blocks.get_block_ids()[0]), local // self.block_size))
                self._loading.add(rid)
                self._store_loaded.add(rid)
            push = p is not None and p.push_to is not None and self._push_allowed(rid, p)
            if push or held < len(keys):
                prompt = list(request.prompt_token_ids or ())
                spec = TransferSpec.for_prompt(p.transfer_id, prompt, self._attempts.get(rid, 0)) if push else None
                self._outgoing[rid] = OutgoingTask(rid, spec, p.push_to if push else None, len(prompt),
                                                   store_keys=keys, store_from=held)
        if receiving and rid not in self._received:
            self._received.add(rid)
            local = self._local_hits.pop(rid, request.num_computed_tokens)
            spec = TransferSpec.for_prompt(p.transfer_id, request.prompt_token_ids)
            if num_external_tokens > 0:
                self._loading.add(rid)
                self._new_loads.append(LoadTask(rid, spec, p.claims, list(blocks.get_block_ids()[0]),
                                                local // self.block_size))
            else:  # vLLM overrode our answer (a request that skips the prefix cache, one asking for prompt
                # logprobs): it computes its prompt, and its transfer is refused and freed, not left to hold
                # decode slots until it goes unclaimed
                self._discards.append(spec.key)

    def _new_attempt(self, request: Any) -> None:
        """vLLM preempted `request` and we have not seen it yet: a prefix-cache reset with running requests
        preempts outside schedule(), and the next schedule() may resume the request before its
        build_connector_meta reads the preemption. The earlier attempt ends here, so the resumed one asks the
        store again and pushes anew instead of keeping the old push (aborted a moment later) or a store load
        never made."""
        rid = request.request_id
        if request.num_preemptions > self._attempts.get(rid, 0):
            self._attempts[rid] = request.num_preemptions
            self._end_attempt(rid, self._aborts)
            self._resumed.add(rid)

    def _end_attempt(self, rid: str, aborts: list[str]) -> None:
        """The request was preempted (its blocks freed): its push, if any, ends now; it asks the store again."""
        self._store_answers.pop(rid, None)  # its chunks may be stored by now: ask again when rescheduled
        self._store_loaded.discard(rid)  # it ran, so its load (if any) succeeded
        if self._outgoing.pop(rid, None) is not None:
            aborts.append(rid)  # this attempt's push ends; the rescheduled request pushes anew

    def _push_allowed(self, rid: str, p: BridgeParams) -> bool:
        if rid not in self._push_checked:
            why = self._push_checked[rid] = self.push_policy.refusal(p.transfer_id, p.push_to, p.push_token)
            if why:
                log.warning("request %s: not pushing to %s: %s", rid, p.push_to, why)
        return not self._push_checked[rid]

    def build_connector_meta(self, out: Any) -> BridgeMetadata:
        idle = out.total_num_scheduled_tokens == 0
        if not (self._outgoing or self._new_loads or self._new_store_loads or self._aborts or self._discards
                or self._lookup_times or self._queue or out.preempted_req_ids):
            return QUIET_IDLE if idle else QUIET  # most decode steps: nothing to move
        meta = BridgeMetadata(loads=self._new_loads, store_loads=self._new_store_loads, aborts=self._aborts,
                              discards=self._discards, idle=idle, lookup_times=self._lookup_times[-1000:],
                              pending=self._queue.due())
        self._lookup_times = []
        self._new_loads, self._new_store_loads, self._aborts, self._discards = [], [], [], []
        resumed, self._resumed = self._resumed, set()
        for rid in out.preempted_req_ids or ():
            # not one whose attempt ended in this step already, nor one that finished since (vLLM reports a
            # preemption outside schedule() in the next step's output, after an abort in between)
            if rid not in resumed and rid not in out.finished_req_ids:
                self._attempts[rid] = self._attempts.get(rid, 0) + 1
                self._end_attempt(rid, meta.aborts)
        for new in out.scheduled_new_reqs if self._outgoing else ():
            task = self._outgoing.get(new.req_id)
            if task is not None:
                task.block_ids = list(new.block_ids[0])
                self._advance(task, new.num_computed_tokens + out.num_scheduled_tokens[new.req_id], meta)
        cached = out.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids if self._outgoing else ()):
            task = self._outgoing.get(rid)
            if task is not None:
                if cached.new_block_ids[i] is not None:
                    task.block_ids.extend(cached.new_block_ids[i][0])
                self._advance(task, cached.num_computed_tokens[i] + out.num_scheduled_tokens[rid], meta)
        meta.quiet = not (meta.outgoing or meta.loads or meta.store_loads or meta.aborts or meta.discards
                          or meta.pending or meta.lookup_times)
        return meta

    def _advance(self, task: OutgoingTask, ready: int, meta: BridgeMetadata) -> None:
        task.ready_tokens = min(ready, task.num_tokens)
        meta.outgoing.append(replace(task, block_ids=list(task.block_ids)))
        if task.ready_tokens >= task.num_tokens:
            del self._outgoing[task.req_id]

    def update_connector_output(self, output: Any) -> None:
        for rid in output.finished_recving or ():
            self._loading.discard(rid)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        rid = request.request_id
        self._queue.left(rid)
        got_load = rid in self._received
        self._received.discard(rid)
        self._store_hits.pop(rid, None)
        self._store_answers.pop(rid, None)
        self._store_loaded.discard(rid)
        if self._lookups is not None:
            self._lookups.forget(rid)
        self._attempts.pop(rid, None)
        self._local_hits.pop(rid, None)
        if self._outgoing.pop(rid, None) is not None or rid in self._loading:
            self._aborts.append(rid)  # vLLM keeps a still-loading request's blocks until we report it
        p = bridge_params(request)
        if p is not None and p.receive and self.is_consumer and not got_load:
            # ended before it was ever scheduled: whatever its producer pushes is refused and freed
            self._discards.append(TransferSpec.for_prompt(p.transfer_id, request.prompt_token_ids or ()).key)
        refused = self._push_checked.pop(rid, "")
        if p is None:
            return False, None
        return False, {PARAMS_KEY: {"transfer_id": p.transfer_id, **({"push_refused": refused} if refused else {})}}

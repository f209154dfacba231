"""Scheduler-side half of the connector: decides what each worker step pushes or receives.

Runs inside vLLM's scheduler, so nothing here may raise on bad request input (that
would take the EngineCore down): malformed `kv_transfer_params` are logged and the
request is served without kvbridge.

Request params (set by the router):
  prefill leg  {"kvbridge": {"transfer_id": T, "push_to": "host:port"}}
  decode leg   {"kvbridge": {"transfer_id": T, "receive": true}}
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

log = logging.getLogger("kvbridge.scheduler")
PARAMS_KEY = "kvbridge"


class BridgeParams(BaseModel):
    model_config = ConfigDict(extra="ignore")
    transfer_id: str
    push_to: str | None = None
    receive: bool = False


@dataclass
class PushTask:
    req_id: str
    transfer_id: str
    consumer: str
    num_tokens: int
    block_ids: list[int] = field(default_factory=list)
    ready_tokens: int = 0


@dataclass
class LoadTask:
    req_id: str
    transfer_id: str
    num_tokens: int
    block_ids: list[int]
    skip_blocks: int


@dataclass
class BridgeMetadata(KVConnectorMetadata):
    pushes: list[PushTask] = field(default_factory=list)
    loads: list[LoadTask] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)   # request ids whose transfer must stop now
    discards: list[str] = field(default_factory=list)  # transfer ids whose decode request has ended
    idle: bool = False                                # nothing computed this step: worker may wait briefly


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


class SchedulerSide:
    def __init__(self, block_size: int, is_producer: bool, is_consumer: bool) -> None:
        self.block_size = block_size
        self.is_producer = is_producer
        self.is_consumer = is_consumer
        self._pushes: dict[str, PushTask] = {}
        self._new_loads: list[LoadTask] = []
        self._loading: set[str] = set()
        self._received: set[str] = set()
        self._aborts: list[str] = []
        self._discards: list[str] = []

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        p = bridge_params(request) if self.is_consumer else None
        if p is None or not p.receive or request.request_id in self._received:
            return 0, False
        n = len(request.prompt_token_ids or ()) - num_computed_tokens
        return (n, True) if n > 0 else (0, False)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        p = bridge_params(request)
        if p is None:
            return
        rid = request.request_id
        if p.push_to and self.is_producer and rid not in self._pushes:
            self._pushes[rid] = PushTask(rid, p.transfer_id, p.push_to, len(request.prompt_token_ids or ()))
        if p.receive and self.is_consumer and rid not in self._received:
            self._received.add(rid)
            if num_external_tokens > 0:
                self._loading.add(rid)
                self._new_loads.append(LoadTask(rid, p.transfer_id, len(request.prompt_token_ids),
                                                list(blocks.get_block_ids()[0]),
                                                request.num_computed_tokens // self.block_size))

    def build_connector_meta(self, out: Any) -> BridgeMetadata:
        meta = BridgeMetadata(loads=self._new_loads, aborts=self._aborts, discards=self._discards,
                              idle=out.total_num_scheduled_tokens == 0)
        self._new_loads, self._aborts, self._discards = [], [], []
        for rid in out.preempted_req_ids or ():
            if self._pushes.pop(rid, None) is not None:
                meta.aborts.append(rid)
        for new in out.scheduled_new_reqs:
            task = self._pushes.get(new.req_id)
            if task is not None:
                task.block_ids = list(new.block_ids[0])
                self._advance(task, new.num_computed_tokens + out.num_scheduled_tokens[new.req_id], meta)
        cached = out.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            task = self._pushes.get(rid)
            if task is not None:
                if cached.new_block_ids[i] is not None:
                    task.block_ids.extend(cached.new_block_ids[i][0])
                self._advance(task, cached.num_computed_tokens[i] + out.num_scheduled_tokens[rid], meta)
        return meta

    def _advance(self, task: PushTask, ready: int, meta: BridgeMetadata) -> None:
        task.ready_tokens = min(ready, task.num_tokens)
        meta.pushes.append(PushTask(task.req_id, task.transfer_id, task.consumer, task.num_tokens,
                                    list(task.block_ids), task.ready_tokens))
        if task.ready_tokens >= task.num_tokens:
            del self._pushes[task.req_id]

    def update_connector_output(self, output: Any) -> None:
        for rid in output.finished_recving or ():
            self._loading.discard(rid)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        rid = request.request_id
        self._received.discard(rid)
        if self._pushes.pop(rid, None) is not None or rid in self._loading:
            self._aborts.append(rid)  # vLLM keeps a still-loading request's blocks until we report it
        p = bridge_params(request)
        if p is not None and p.receive and self.is_consumer:
            self._discards.append(p.transfer_id)  # covers requests aborted before their KV was ever claimed
        return False, ({PARAMS_KEY: {"transfer_id": p.transfer_id}} if p else None)

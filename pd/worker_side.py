"""Worker-side half of the connector: gathers and pushes on the producer, scatters on the consumer.

Producer: after each forward (`wait_for_save`) every chunk whose tokens now exist is
gathered into staging and handed to the push engine, so chunks leave while later
prefill chunks compute. Consumer: each step checks its expected transfers; a complete
one is verified, scattered into the blocks vLLM allocated and its slots released; one
that expires or fails is reported as a failed receive, and vLLM's
`kv_load_failure_policy` (recompute | fail) decides what the request sees.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from pd.connector_config import ConnectorConfig
from pd.consumer_endpoint import ConsumerEndpoint
from pd.layout import KVLayout
from pd.paged_kv import PagedKV
from pd.producer import Producer, ProducerSettings
from pd.scheduler_side import BridgeMetadata, LoadTask, PushTask
from pd.states import State, Transfer

log = logging.getLogger("kvbridge.worker")


def detect_cache_layout(t: torch.Tensor, block_size: int) -> str:
    if t.device.type == "cpu":
        return "LBHNC"
    return "NHD" if t.dim() == 5 and t.shape[2] == block_size else "HND"


def layout_from_vllm(vllm_config, kv_caches: dict[str, torch.Tensor], model_id: str) -> KVLayout:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    first = next(iter(kv_caches.values()))
    block_size = vllm_config.cache_config.block_size
    return KVLayout(model_id=model_id or os.path.basename(mc.model.rstrip("/")), num_layers=len(kv_caches),
                    num_kv_heads=mc.get_total_num_kv_heads(), kv_heads_per_rank=mc.get_num_kv_heads(pc),
                    head_size=mc.get_head_size(), dtype=str(first.dtype).removeprefix("torch."),
                    block_size=block_size, cache_layout=detect_cache_layout(first, block_size),
                    tp_size=pc.tensor_parallel_size, tp_rank=get_tensor_model_parallel_rank())


@dataclass
class _Load:
    task: LoadTask
    t: Transfer
    n_chunks: int
    started: float
    seen: bool = False


class WorkerSide:
    def __init__(self, cfg: ConnectorConfig, vllm_config, is_producer: bool, is_consumer: bool) -> None:
        self.cfg = cfg
        self.vllm_config = vllm_config
        self.is_producer, self.is_consumer = is_producer, is_consumer
        self.kv: PagedKV | None = None
        self.producer: Producer | None = None
        self.endpoint: ConsumerEndpoint | None = None
        self._pushing: dict[str, tuple[str, int]] = {}  # req_id -> (transfer id, next chunk to stage)
        self._loads: dict[str, _Load] = {}
        self._done_recv: set[str] = set()
        self._failed_recv: set[str] = set()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        # Our control threads share the GIL with vLLM's busy main thread; the default 5 ms switch
        # interval would add that much to every lease RPC and every UCX progress call.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        layout = layout_from_vllm(self.vllm_config, kv_caches, self.cfg.model_id)
        self.kv = PagedKV(kv_caches, layout)
        bs = layout.block_size
        self.blocks_per_chunk = max(1, -(-self.cfg.chunk_tokens // bs))
        self.chunk_tokens = chunk_tokens = self.blocks_per_chunk * bs
        device = str(next(iter(kv_caches.values())).device)
        port = self.cfg.listen_port + layout.tp_rank if self.cfg.listen_port else 0
        name = self.cfg.instance_id or f"{'prefill' if self.is_producer else 'decode'}-{port}"
        if self.is_consumer:
            self.endpoint = ConsumerEndpoint(layout, chunk_tokens, self.cfg.num_slots, self.cfg.listen_host, port,
                                             self.cfg.secret, device, self.cfg.quarantine_s, self.cfg.unclaimed_ttl_s)
        if self.is_producer:
            self.producer = Producer(layout, chunk_tokens, ProducerSettings(
                producer_id=name, staging_chunks=self.cfg.staging_chunks, lease_ttl_s=self.cfg.lease_ttl_s,
                write_margin_s=self.cfg.write_margin_s, alloc_timeout_s=self.cfg.alloc_timeout_s,
                checksum=self.cfg.checksum, secret=self.cfg.secret, device=device))
        log.info("kvbridge %s ready: %s, %d tokens/chunk (%d bytes)", name, layout.model_dump(), chunk_tokens,
                 layout.chunk_bytes(chunk_tokens))

    def _chunk_blocks(self, n_tokens: int, chunk: int) -> tuple[int, int]:
        n_blocks = -(-n_tokens // self.kv.layout.block_size)
        return chunk * self.blocks_per_chunk, min((chunk + 1) * self.blocks_per_chunk, n_blocks)

    def _n_chunks(self, n_tokens: int) -> int:
        return -(-n_tokens // self.chunk_tokens)

    def on_bind(self, meta: BridgeMetadata) -> None:
        """Ask consumers for leases while this step's forward computes, so a long prefill shows up on the
        consumer as a live, renewed lease instead of silence that its load timeout would end."""
        for task in meta.pushes:
            if task.req_id not in self._pushing:
                self.producer.begin(task.transfer_id, task.consumer, self._n_chunks(task.num_tokens))
                self._pushing[task.req_id] = (task.transfer_id, 0)

    def start_load_kv(self, meta: BridgeMetadata) -> None:
        for rid in meta.aborts:
            self._abort(rid)
        for tid in meta.discards:
            self.endpoint.discard(tid)
        for task in meta.loads:
            self._loads[task.req_id] = _Load(task, Transfer(task.transfer_id, "consumer"),
                                              self._n_chunks(task.num_tokens), time.monotonic())

    def wait_for_save(self, meta: BridgeMetadata) -> None:
        for task in meta.pushes:
            self._push_ready_chunks(task)

    def _push_ready_chunks(self, task: PushTask) -> None:
        if task.req_id not in self._pushing:
            return  # ended early (failed or aborted); the consumer falls back by policy
        tid, nxt = self._pushing[task.req_id]
        n_chunks = self._n_chunks(task.num_tokens)
        while nxt < n_chunks and min((nxt + 1) * self.chunk_tokens, task.num_tokens) <= task.ready_tokens:
            lo, hi = self._chunk_blocks(task.num_tokens, nxt)
            if not self.producer.stage(tid, nxt, lambda view, ids=task.block_ids[lo:hi]: self.kv.gather(ids, view)):
                nxt = n_chunks  # the transfer ended (failed or aborted); the consumer falls back by policy
                break
            nxt += 1
        if nxt < n_chunks:
            self._pushing[task.req_id] = (tid, nxt)
        else:
            self._pushing.pop(task.req_id, None)

    def get_transfer_results(self, idle: bool) -> KVConnectorTransferResults:
        if self.producer is not None:
            self.producer.take_finished()
        if self._loads:
            self._check_loads()
            if idle and not self._done_recv and self._loads:
                # Nothing to compute: sleep until a chunk lands (or idle_wait_ms) instead of letting
                # the engine spin through empty steps on the cores the prefill may need.
                self.endpoint.wait_arrivals(self.cfg.idle_wait_ms / 1000)
                self._check_loads()
        done, failed = self._done_recv, self._failed_recv
        self._done_recv, self._failed_recv = set(), set()
        return KVConnectorTransferResults(finished_recving=done | failed, failed_recving=failed)

    def _check_loads(self) -> None:
        now = time.monotonic()
        for rid, ld in list(self._loads.items()):
            if self.endpoint.is_discarded(ld.task.transfer_id):
                self._finish_load(rid, State.EXPIRED, "cancelled: the prefill leg failed or went away")
                continue
            lease = self.endpoint.pool.live(ld.task.transfer_id)
            if lease is None:
                if ld.seen or now - ld.started > self.cfg.load_timeout_s:
                    why = "lease ended before all chunks arrived" if ld.seen else \
                        f"no KV arrived within {self.cfg.load_timeout_s}s"
                    self._finish_load(rid, State.EXPIRED, why)
                continue
            if not ld.seen:
                ld.seen = True
                ld.t.to(State.RECEIVING)
            if lease.complete:
                self._scatter(rid, ld, lease)

    def _scatter(self, rid: str, ld: _Load, lease) -> None:
        if len(lease.slots) != ld.n_chunks:
            self._finish_load(rid, State.FAILED, f"producer sent {len(lease.slots)} chunks, expected {ld.n_chunks}")
            return
        bad = self.endpoint.verify(lease)
        if bad:
            self._finish_load(rid, State.FAILED, f"checksum mismatch in chunks {bad}")
            return
        ld.t.to(State.RECEIVED)
        for c, slot in enumerate(lease.slots):
            lo, hi = self._chunk_blocks(ld.task.num_tokens, c)
            ids = ld.task.block_ids[lo:hi]
            skip = max(0, min(ld.task.skip_blocks - lo, len(ids)))
            self.kv.scatter(ids, self.endpoint.slot_view(slot)[:lease.arrived[c].nbytes], skip)
        self.endpoint.count("tokens_scattered", ld.task.num_tokens - ld.task.skip_blocks * self.kv.layout.block_size)
        self._finish_load(rid, State.SCATTERED)

    def _finish_load(self, rid: str, state: State, reason: str = "") -> None:
        ld = self._loads.pop(rid)
        self.endpoint.pool.release(ld.task.transfer_id)
        ld.t.to(state, reason)
        self.endpoint.count(f"transfers_{state.value.lower()}")
        (self._done_recv if state == State.SCATTERED else self._failed_recv).add(rid)

    def _abort(self, rid: str) -> None:
        if rid in self._loads:
            self._finish_load(rid, State.ABORTED, "request finished before its KV was used")
        pushing = self._pushing.pop(rid, None)
        if pushing is not None:
            self.producer.abort(pushing[0])

    def shutdown(self) -> None:
        if self.producer is not None:
            self.producer.close()
        if self.endpoint is not None:
            self.endpoint.close()

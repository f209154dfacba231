"""Worker-side half of the connector: gathers and pushes on the producer, scatters on the consumer.

Producer (pd/push_side.py): the chunks a forward completes leave a group of layers at a time while it computes,
and every other chunk whose tokens exist after the forward leaves whole, so chunks leave while later prefill
chunks compute; with a store, each new whole chunk is also kept there; chunks the scheduler found in the store
load asynchronously (pd/store_loads.py: fetched off the engine thread, scattered from memory once fetched,
reported as a finished receive; one that went missing is reported as a load error and recomputed).
Consumer: each step checks its expected transfers; a complete one is verified, scattered into the blocks vLLM
allocated and its slots released (a windowed one chunk by chunk as it lands: pd/lease_scatter.py); one that
expires (no sign of life for `load_timeout_s`, or none `no_show_s` after its prefill answered, as the router says;
both at least `handshake_grace_s` on a prefill node's first contact, transfer/answered_notices.py, and `no_show_s`
also while a producer admitted lately may be finishing its handshake) or fails is a failed receive, and vLLM's
`kv_load_failure_policy` (recompute | fail) decides what the request sees.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

import torch
from prometheus_client import start_http_server
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from pd.connector_config import ConnectorConfig
from transfer.consumer_endpoint import ConsumerEndpoint
from transfer.consumer_settings import ConsumerSettings
from pd.cache_layout import layer_names, layout_from_vllm
from pd.device_memory import report_device_memory
from pd.exposed_time import observe_exposed
from pd.hook_timer import WORKER_HOOKS
from pd.paged_kv import PagedKV
from pd.prefix_store import PrefixStore, model_fingerprint, store_key
from pd.push_side import PushSide
from pd.store_loads import StoreLoads
from transfer.producer import Producer, ProducerSettings
from pd.step_metadata import NOTHING, BridgeMetadata, LoadTask
from transfer.device_fence import COMPLETED, Fence, recorder_for
from transfer.rank_address import rank_address
from transfer.receive_book import Arrival
from transfer.states import State, Transfer
from pd.store_lookup import LOOKUP_SECONDS, LookupServer, StoreHandshake
from pd.lease_scatter import scatter_landed, scatter_whole
from pd.transfer_stats import BridgeTransferStats
from storage.admin_server import StoreAdminServer

log = logging.getLogger("kvbridge.worker")


@dataclass
class _Load:
    task: LoadTask
    t: Transfer
    last_sign: float  # the load times out this long after the transfer last showed life
    streamed: list = field(default_factory=list)  # a windowed transfer: the notices of the chunks scattered so far


class WorkerSide:
    def __init__(self, cfg: ConnectorConfig, vllm_config, is_producer: bool, is_consumer: bool,
                 secret: bytes | None = None) -> None:
        self.cfg = cfg
        self._secret = secret  # the deployment secret: control-message keys and the store's MAC key derive from it
        self.vllm_config = vllm_config
        self.is_producer, self.is_consumer = is_producer, is_consumer
        self.store: PrefixStore | None = None
        self.lookup_server: LookupServer | None = None
        self.store_admin: StoreAdminServer | None = None
        self.store_loads: StoreLoads | None = None
        self.kv: PagedKV | None = None
        self.producer: Producer | None = None
        self.push: PushSide | None = None
        self.endpoint: ConsumerEndpoint | None = None
        self._load_errors: set[int] = set()
        self._loads: dict[str, _Load] = {}
        self._done_recv, self._failed_recv = set[str](), set[str]()
        self.stats = BridgeTransferStats()  # what vLLM's KV-transfer metrics show (pd/transfer_stats.py)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        faulthandler.register(signal.SIGUSR2, all_threads=True)  # `kill -USR2 <worker>`: every thread's stack
        # kvbridge's threads share the interpreter with vLLM's busy main thread. Measured with bench/pd_bench.py
        # (decode node at 5 ms vs 0.5 ms, same run conditions): TTFT overhead +334/+1014 ms vs +72/+69 ms at
        # 128/1000 tokens, time per output token no better at 5 ms. bench/switch_interval_bench.py, per role: 0.5 ms on
        # both moved KV fastest (20 ms last chunk -> seen, 61 at 5 ms on both), the pushing prefill's engine kept the
        # most speed (0.75 of alone, 0.44) and a receiving decode's step did not slow. So 0.5 ms on both, configurable.
        sys.setswitchinterval(self.cfg.gil_switch_interval_ms / 1000)
        layout, views = layout_from_vllm(self.vllm_config, kv_caches, self.cfg.model_id,
                                         model_fingerprint(self.vllm_config.model_config.model))
        self.kv = PagedKV(views, layout)
        self._fence = recorder_for(str(self.kv.device))
        bs = layout.block_size
        self.blocks_per_chunk = max(1, -(-self.cfg.chunk_tokens // bs))
        self.chunk_tokens = chunk_tokens = self.blocks_per_chunk * bs
        device, chunk_bytes = str(self.kv.device), layout.chunk_bytes(chunk_tokens)
        port = self.cfg.listen_port + layout.tp_rank if self.cfg.listen_port else 0
        # Unique per process unless configured: two nodes started from the same command never collide.
        name = self.cfg.instance_id or \
            f"{'prefill' if self.is_producer else 'decode'}-{socket.gethostname()}-{os.getpid()}"
        if self.is_consumer:
            self.endpoint = ConsumerEndpoint(layout, ConsumerSettings(
                chunk_tokens=chunk_tokens, num_slots=self.cfg.slots_for(chunk_bytes), host=self.cfg.listen_host, port=port,
                secret=self._secret, insecure=self.cfg.insecure,
                device="pinned" if self.cfg.slot_memory == "host" else device, quarantine_s=self.cfg.quarantine_s,
                fence_timeout_s=self.cfg.fence_timeout_s, unclaimed_ttl_s=self.cfg.unclaimed_ttl_s,
                window_slots=self.cfg.window_slots, handshake_grace_s=self.cfg.handshake_grace_s,
                ucx_error_handling=self.cfg.ucx_error_handling))
        if self.is_producer:
            self.producer = Producer(layout, chunk_tokens, ProducerSettings(
                producer_id=f"{name}/rank{layout.tp_rank}", staging_chunks=self.cfg.staging_for(chunk_bytes), lease_ttl_s=self.cfg.lease_ttl_s,
                write_margin_s=self.cfg.write_margin_s, alloc_timeout_s=self.cfg.alloc_timeout_s,
                checksum=self.cfg.checksum, secret=self._secret, device=device,
                ucx_error_handling=self.cfg.ucx_error_handling))
        if self.cfg.store is not None and self.is_producer:
            mc = self.vllm_config.model_config
            self.store = PrefixStore(self.cfg.store, layout, chunk_tokens, mc.model,
                                     store_key(self._secret) if self._secret is not None else None,
                                     mc.revision, self.vllm_config.parallel_config.pipeline_parallel_size)
            self.lookup_server = LookupServer(self.store)  # loopback only: the scheduler is on this host
            self.store_loads = StoreLoads(self.store, self.kv, self.blocks_per_chunk, chunk_tokens, self._load_errors)
            if self.cfg.store.admin_port:
                self.store_admin = StoreAdminServer(self.store.store, self.cfg.listen_host, self.cfg.store.admin_port
                                                    + layout.tp_rank, self._secret, self.cfg.insecure)
        if self.producer is not None:
            self.push = PushSide(self.kv, self.producer, self.store, self.blocks_per_chunk, layer_names(kv_caches),
                                 self.cfg.layer_groups)
        if self.cfg.metrics_port:
            start_http_server(self.cfg.metrics_port + layout.tp_rank, addr=self.cfg.listen_host)
        log.info("kvbridge %s ready: %s, %d tokens/chunk (%d bytes), UCX error handling %s, UCX_CMA_SEG_SIZE %s", name,
                 layout.model_dump(), chunk_tokens, layout.chunk_bytes(chunk_tokens),
                 (self.endpoint or self.producer).agent.error_handling, os.environ.get("UCX_CMA_SEG_SIZE"))
        report_device_memory(self.kv.device, self.endpoint.region if self.endpoint else None,
                             self.producer.staging.region if self.producer else None,
                             scratch_bytes=self.kv.chunk_nbytes(self.blocks_per_chunk) if self.store else 0)

    def _chunk_blocks(self, n_tokens: int, chunk: int) -> tuple[int, int]:
        n_blocks = -(-n_tokens // self.kv.layout.block_size)
        return chunk * self.blocks_per_chunk, min((chunk + 1) * self.blocks_per_chunk, n_blocks)

    def on_bind(self, meta: BridgeMetadata) -> bool:
        """Ask consumers for leases while this step's forward computes, so a long prefill shows up on the
        consumer as a live, renewed lease instead of silence that its load timeout would end. Aborts come
        first: a preempted request's old attempt ends before its new attempt begins. True when chunks leave
        layer by layer in this forward (`layer_done`)."""
        for rid in meta.aborts:
            self._abort(rid)
        for key, consumer in meta.pending:  # requests still in our queue: a sign of life to their consumers
            self.producer.announcer.announce(key, rank_address(consumer, self.kv.layout.tp_rank))
        return self.push.begin(meta.outgoing) if self.push is not None else False

    def start_load_kv(self, meta: BridgeMetadata) -> None:
        for answer, seconds in meta.lookup_times:
            LOOKUP_SECONDS.labels(answer).observe(seconds)
        for key in meta.discards:
            self.endpoint.book.discard(key)
        for task in meta.loads:
            self.endpoint.book.expect(task.spec.key, task.spec.num_tokens, task.spec.token_hash, task.claims,
                                      held_chunks=task.skip_blocks // self.blocks_per_chunk)
            self._loads[task.req_id] = _Load(task, Transfer(task.spec.key, "consumer"), time.monotonic())
        for st in meta.store_loads:
            self.store_loads.add(st)  # scattered once its chunks are in memory (pd/store_loads.py)

    def handshake_metadata(self) -> StoreHandshake | None:
        """What the scheduler needs to ask this worker's store (see pd/store_lookup.py)."""
        if self.lookup_server is None:
            return None
        return StoreHandshake(self.lookup_server.address, self.store.seed, self.store.chunk_tokens)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors = set(self._load_errors)
        self._load_errors.clear()  # the same set: pd/store_loads.py adds to it
        return errors

    def wait_for_save(self, meta: BridgeMetadata) -> None:
        if self.push is not None:
            self.push.after_forward(meta.outgoing)

    def get_transfer_results(self, idle: bool) -> KVConnectorTransferResults:
        if self.producer is None and self.store_loads is None and not (self._loads or self._done_recv or self._failed_recv):
            return NOTHING  # a decode node's usual step: nothing in flight
        for t in self.producer.take_finished() if self.producer is not None else ():
            self.stats.record_send(t, self.push.last_staged.pop(t.transfer_id, None))
        if self._loads:
            seen = self.endpoint.arrivals  # before the look: a chunk landing after it ends the wait below
            self._check_loads()
            if idle and not self._done_recv and self._loads:
                # Nothing to compute: sleep until a chunk lands (or idle_wait_ms) instead of letting
                # the engine spin through empty steps on the cores the prefill may need.
                t0 = time.perf_counter_ns()
                self.endpoint.wait_arrivals(self.cfg.idle_wait_ms / 1000, seen)
                WORKER_HOOKS.idle(time.perf_counter_ns() - t0)
                self._check_loads()
        if self.store_loads is not None and self.store_loads.pending:
            self._done_recv |= self.store_loads.finished()
            if idle and not self._done_recv:   # nothing to compute: sleep until a fetch ends, not spin
                self.store_loads.wait(self.cfg.idle_wait_ms / 1000)
                self._done_recv |= self.store_loads.finished()
        done, failed = self._done_recv, self._failed_recv
        self._done_recv, self._failed_recv = set(), set()
        return KVConnectorTransferResults(finished_recving=done | failed, failed_recving=failed)

    def _check_loads(self) -> None:
        now = time.monotonic()
        book = self.endpoint.book
        no_show_s = self.endpoint.producers.no_show_s(self.cfg.no_show_s, self.cfg.handshake_grace_s)
        for rid, ld in list(self._loads.items()):
            arrival, reason = book.status(ld.task.spec.key)
            if arrival == Arrival.ENDED:
                self._finish_load(rid, State.FAILED, reason)
            elif arrival == Arrival.WAITING:  # a queued prefill or an ALLOC waiting for slots is a sign too
                sign, (answered, first) = book.last_sign(ld.task.spec.key), book.answered.at(ld.task.spec.key)
                grace = self.cfg.handshake_grace_s if first else 0.0  # a first contact: a handshake comes first
                quiet_s = max(self.cfg.load_timeout_s, grace)
                if now - max(ld.last_sign, sign) > quiet_s:
                    self._finish_load(rid, State.EXPIRED, f"no sign of the transfer for {quiet_s}s")
                elif answered > sign and now - answered > max(no_show_s, grace):
                    self._finish_load(rid, State.EXPIRED, f"its prefill node answered {now - answered:.1f}s ago "
                                      f"and its producer never reached this node{' (first contact)' if first else ''}")
            else:
                ld.last_sign = now
                if ld.t.state == State.EXPECTED:
                    ld.t.to(State.RECEIVING)
                step = scatter_landed(self.endpoint, self.kv, ld.task, rid, self._chunk_blocks, self.blocks_per_chunk,
                                      self._fence)  # a windowed transfer is scattered as it lands
                ld.streamed += step.notices
                if step.failed:
                    self._finish_load(rid, State.FAILED, step.failed)
                elif step.done:
                    self._scattered(rid, ld, nbytes=sum(n.nbytes for n in ld.streamed))
                    observe_exposed(ld.streamed)
                elif arrival == Arrival.COMPLETE and not step.windowed:
                    self._scatter(rid, ld)

    def _scatter(self, rid: str, ld: _Load) -> None:
        lease, why = scatter_whole(self.endpoint, self.kv, ld.task, self._chunk_blocks, self.blocks_per_chunk)
        if why:
            self._finish_load(rid, State.FAILED, why, lease)
            return
        self._scattered(rid, ld, lease, self._fence(), sum(lease.chunk_nbytes))  # slots free once it ran
        observe_exposed(lease.arrived.values())  # vLLM learns of it when this step's results return

    def _scattered(self, rid: str, ld: _Load, lease=None, fence: Fence = COMPLETED, nbytes: int = 0) -> None:
        ld.t.to(State.RECEIVED)
        self.endpoint.book.count("tokens_scattered", ld.task.spec.num_tokens - ld.task.skip_blocks * self.kv.layout.block_size)
        self._finish_load(rid, State.SCATTERED, lease=lease, fence=fence, nbytes=nbytes)

    def _finish_load(self, rid: str, state: State, reason: str = "", lease=None, fence: Fence = COMPLETED,
                     nbytes: int = 0) -> None:
        ld = self._loads.pop(rid)
        ld.t.to(state, reason)
        self.stats.record_receive(ld.t, nbytes)
        self.endpoint.book.finish(ld.task.spec.key, lease, ld.t.trace(), fence)
        (self._done_recv if state == State.SCATTERED else self._failed_recv).add(rid)

    def _abort(self, rid: str) -> None:
        if self.store_loads is not None and self.store_loads.drop(rid):
            self._done_recv.add(rid)  # vLLM frees a loading request's blocks once its id is reported
        if rid in self._loads:
            self._finish_load(rid, State.ABORTED, "request finished before its KV was used")
        if self.push is not None:
            self.push.abort(rid)

    def shutdown(self) -> None:
        for part in (self.store_admin, self.lookup_server, self.store, self.producer, self.endpoint):
            if part is not None:
                part.close()

"""KVBridgeConnector: the thin facade vLLM loads; it delegates to the scheduler and worker sides.

    --kv-transfer-config '{"kv_connector": "KVBridgeConnector", "kv_connector_module_path": "pd.connector",
                           "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
                           "kv_load_failure_policy": "recompute" | "fail",
                           "kv_connector_extra_config": {...}}'   # see pd/connector_config.py
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from pd.connector_config import ConnectorConfig
from pd.hook_timer import SCHEDULER_HOOKS, WORKER_HOOKS
from pd.scheduler_side import SchedulerSide
from pd.step_metadata import QUIET, BridgeMetadata
from pd.transfer_stats import BridgePromMetrics, BridgeTransferStats


def route_logs_through_vllm() -> None:
    """kvbridge's loggers print with vLLM's handlers and format, at KVBRIDGE_LOG_LEVEL (INFO)."""
    ours = logging.getLogger("kvbridge")
    if not ours.handlers:
        ours.handlers = list(logging.getLogger("vllm").handlers)
        ours.setLevel(os.environ.get("KVBRIDGE_LOG_LEVEL", "INFO").upper())
        ours.propagate = False


class KVBridgeConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        route_logs_through_vllm()
        tc = vllm_config.kv_transfer_config
        cfg = ConnectorConfig.from_extra(tc.kv_connector_extra_config)
        is_producer, is_consumer = tc.kv_role in ("kv_producer", "kv_both"), tc.kv_role in ("kv_consumer", "kv_both")
        secret = cfg.secret()  # from the environment or a file, never from the config (see connector_config.py)
        self.scheduler_side: SchedulerSide | None = None
        self.worker_side = None
        self._layers_open = False  # this step's forward hands chunks over layer by layer (save_kv_layer)
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler_side = SchedulerSide(vllm_config.cache_config.block_size, is_producer, is_consumer,
                                                cfg.store.lookup_timeout_s if cfg.store else None,
                                                cfg.push_policy(secret))
        else:
            from pd.worker_side import (
                WorkerSide,  # NIXL and torch buffers live only in the worker
            )
            self.worker_side = WorkerSide(cfg, vllm_config, is_producer, is_consumer, secret)

    # scheduler side
    @SCHEDULER_HOOKS.timed
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    @SCHEDULER_HOOKS.timed
    def on_new_request(self, request: Any) -> None:
        self.scheduler_side.on_new_request(request)

    @SCHEDULER_HOOKS.timed
    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self.scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

    @SCHEDULER_HOOKS.timed
    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return self.scheduler_side.build_connector_meta(scheduler_output)

    @SCHEDULER_HOOKS.timed
    def update_connector_output(self, connector_output: Any) -> None:
        self.scheduler_side.update_connector_output(connector_output)

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        self.scheduler_side.set_store_handshakes(metadata)

    @SCHEDULER_HOOKS.timed
    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler_side.request_finished(request, block_ids)

    # worker side: vLLM calls these on every engine step, so a quiet step (nothing to move: the usual decode
    # step) returns at its first check; measured per step by bench/hook_cost.py
    @WORKER_HOOKS.timed
    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        # before the forward: lease requests go out now, and the chunks this forward completes are opened
        self._layers_open = not connector_metadata.quiet and self.worker_side.on_bind(connector_metadata)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker_side.register_kv_caches(kv_caches)

    @WORKER_HOOKS.timed
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._meta()
        if not meta.quiet:
            self.worker_side.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads complete before the request is scheduled (async receive)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        if self._layers_open:  # vLLM calls this after every attention layer of every step
            self.worker_side.push.layer_done(layer_name)

    @WORKER_HOOKS.timed
    def wait_for_save(self) -> None:
        meta = self._meta()
        if not meta.quiet:
            self.worker_side.wait_for_save(meta)

    @WORKER_HOOKS.timed
    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        return self.worker_side.get_transfer_results(self._meta().idle)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self.worker_side.handshake_metadata()

    @WORKER_HOOKS.timed
    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.get_block_ids_with_load_errors()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        r = self.get_transfer_results(finished_req_ids)
        return r.finished_sending or None, r.finished_recving or None

    def get_kv_connector_stats(self) -> BridgeTransferStats | None:
        """Transfers that ended since the last step (vLLM asks the scheduler side too: it has none)."""
        return self.worker_side.stats.take() if self.worker_side is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> BridgeTransferStats:
        return BridgeTransferStats(data=data or {})

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> BridgePromMetrics:
        return BridgePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self.worker_side is not None:
            self.worker_side.shutdown()

    def _meta(self) -> BridgeMetadata:
        return self._connector_metadata or QUIET  # vLLM's base class holds the step's metadata there

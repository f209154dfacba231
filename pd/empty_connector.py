"""A connector that moves nothing: the floor under any connector's per-step hook cost.

bench/hook_cost.py runs it beside kvbridge and NixlConnector-best on a decode node. Its hooks return at once or are
vLLM's base-class defaults, and they are timed by the same wrapper as the other two (pd/hook_timer.py), so what it
logs per engine step is the floor of the timed hooks on this machine: the wrapper, the calls and vLLM's default
bodies. A connector's figure minus this one is that connector's own work in those hooks. (vLLM calls a few more
hooks per step that nobody times; the whole cost of having a connector is the per-token ratio to aggregated vLLM
that the bench prints for this node too.) Load it with
`"kv_connector": "EmptyConnector", "kv_connector_module_path": "pd.empty_connector"`.
"""
from __future__ import annotations

from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from pd.connector import route_logs_through_vllm
from pd.hook_timer import time_peer_hooks


class _NoMetadata(KVConnectorMetadata):
    pass


_NOTHING = _NoMetadata()


class EmptyConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        route_logs_through_vllm()  # the hook timer's lines

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return _NOTHING

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None


time_peer_hooks(EmptyConnector)

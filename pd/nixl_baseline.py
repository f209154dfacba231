"""The baseline bench/pd_bench.py compares kvbridge with: vLLM's NixlConnector (pull), NIXL's progress thread off.

vLLM creates its NIXL agent with the progress thread on, and no connector setting turns it off; that thread
keeps a core busy even when idle (bench/idle_cpu.py), which on a 2-core machine slows the prefill's compute.
With it off, the engine's own per-step polling drives UCX, as kvbridge's push thread does for ours: NixlConnector
at its best on a small CPU box. Load it with `"kv_connector": "NixlConnector", "kv_connector_module_path":
"pd.nixl_baseline"`. It lives here because pd/ is the one package that imports vLLM.
"""
from __future__ import annotations

import functools
import sys

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector as _StockNixlConnector

_sync = sys.modules[base_worker.nixl_agent_config.__module__].nixl_thread_sync_t
# Strict locking: vLLM calls the agent from more than one thread (handshakes beside the engine's polling); with
# no progress thread and no lock the first bench run hung a prefill worker on its third request.
base_worker.nixl_agent_config = functools.partial(base_worker.nixl_agent_config, enable_prog_thread=False,
                                                  sync_mode=_sync.NIXL_THREAD_SYNC_STRICT)


class NixlConnector(_StockNixlConnector):
    """The stock connector; only its NIXL agent's configuration differs (see the module docstring)."""

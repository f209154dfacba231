"""vLLM's NixlConnector with NIXL's progress thread off, for bench/pd_bench.py's "nixl-best" phase.

vLLM creates its NIXL agent with the progress thread on and no connector setting turns it off; that thread
spins (NIXL starts it with no delay between polls), so it keeps a core busy even when idle, which on a
2-core machine takes the other node's compute. With it off, UCX moves only when someone calls into the
agent. Load it with `"kv_connector": "NixlConnector", "kv_connector_module_path": "pd.nixl_best"`.
It also gets the UCX copy segment kvbridge's agents use (transfer/nixl_agent.py's CMA_SEG_SIZE, unless the
server's environment sets UCX_CMA_SEG_SIZE): a setting of ours that would help the peer too is the peer's.

Diagnostic knobs (environment of the vLLM server): KVB_NIXL_PROG_THREAD=1 keeps the thread on,
KVB_NIXL_SYNC=none|strict|rw picks NIXL's agent locking (unset: NIXL's default), KVB_NIXL_PYSTACKS=1 makes
SIGUSR2 print every thread's Python stack to the server's log (bench/nixl_probe.py sends it on a stall).

Its per-step hooks are timed by the same wrapper as kvbridge's (pd/hook_timer.py: one "connector hooks: X us/step"
log line per process every 10 s), so bench/hook_cost.py compares the two connectors' cost to the engine loop,
each paying the same ~1 us per call for being timed.
"""
from __future__ import annotations

import faulthandler
import functools
import os
import signal
import sys

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector as _StockNixlConnector

from pd.connector import route_logs_through_vllm
from pd.hook_timer import time_peer_hooks
from transfer.nixl_agent import CMA_SEG_SIZE

_config = base_worker.nixl_agent_config
_sync_t = sys.modules[_config.__module__].nixl_thread_sync_t
_SYNC = {"none": _sync_t.NIXL_THREAD_SYNC_NONE, "strict": _sync_t.NIXL_THREAD_SYNC_STRICT,
         "rw": _sync_t.NIXL_THREAD_SYNC_RW}
_kwargs: dict = {"enable_prog_thread": os.environ.get("KVB_NIXL_PROG_THREAD", "0") == "1"}
if os.environ.get("KVB_NIXL_SYNC"):
    _kwargs["sync_mode"] = _SYNC[os.environ["KVB_NIXL_SYNC"]]
base_worker.nixl_agent_config = functools.partial(_config, **_kwargs)
os.environ.setdefault("UCX_CMA_SEG_SIZE", CMA_SEG_SIZE)  # before vLLM creates the agent
if os.environ.get("KVB_NIXL_PYSTACKS") == "1":
    faulthandler.register(signal.SIGUSR2, all_threads=True)


class NixlConnector(_StockNixlConnector):
    """The stock connector; its NIXL agent's configuration differs (see the module docstring), and its worker keeps
    the core binding the server was started with."""

    def __init__(self, *args, **kwargs) -> None:
        # On CPU the stock worker pins the calling thread (the worker's main thread, which also runs the model's
        # compute) to the last core of each NUMA node, whatever VLLM_CPU_OMP_THREADS_BIND said: on a 2-core box
        # the prefill's and the decode's compute then share core 1. Put the binding back (KVB_NIXL_KEEP_BINDING=0:
        # keep the stock pinning).
        cpus = os.sched_getaffinity(0)
        super().__init__(*args, **kwargs)
        route_logs_through_vllm()  # the hook timer's lines
        if os.environ.get("KVB_NIXL_KEEP_BINDING", "1") == "1":
            os.sched_setaffinity(0, cpus)


time_peer_hooks(NixlConnector)  # timed as kvbridge's hooks are

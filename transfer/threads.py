"""Background threads for control and progress work.

vLLM's CPU worker pins its process to the compute cores; threads it starts inherit
that, so our control thread would queue behind OpenMP compute and a lease RPC could
take seconds. These threads are mostly asleep, so they may run on any core.

The same goes for ZMQ's own I/O thread, which moves every byte of a context's sockets: started
from a pinned thread it sits on the compute core, and a message waits there however idle the
thread that reads it (a store lookup went unanswered for over 1 s, its server thread idle in
poll, while the prefill computed). So kvbridge's sockets share one context whose I/O threads
may run on any core (`io_context`). Sharing it means a socket must never block that I/O thread: a
monitored socket's events must be read (consumer_link.py).
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from typing import Callable

import zmq

_context: zmq.Context | None = None
_context_lock = threading.Lock()


def widen_affinity() -> None:
    """Let the calling thread run on any core."""
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed: keep the inherited set


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` (15 characters kept) where `top -H`, `ps -L` and /proc show threads, so
    an operator sees which of a vLLM worker's threads is kvbridge's and what it costs."""
    try:
        _libc().pthread_setname_np(ctypes.c_ulong(threading.get_ident()), name.encode()[:15])
    except (OSError, AttributeError):
        pass  # not glibc: the thread keeps its process's name


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)  # the process's own symbols (libc among them): no library search, no subprocess


def prepare_io_thread(name: str) -> None:
    """What each kvbridge background thread does first: any core, and its name ('kvbridge-x' shows as 'kvb-x')."""
    widen_affinity()
    name_os_thread(name.replace("kvbridge-", "kvb-"))


def start_io_thread(target: Callable[[], None], name: str) -> threading.Thread:
    def run() -> None:
        prepare_io_thread(name)
        target()

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t


def io_context() -> zmq.Context:
    """kvbridge's ZMQ context (one per process), its I/O threads free to run on any core."""
    global _context
    with _context_lock:
        if _context is None:
            ctx = zmq.Context()
            for cpu in range(os.cpu_count() or 1):
                ctx.set(zmq.THREAD_AFFINITY_CPU_ADD, cpu)  # before the first socket starts the I/O thread
            _context = ctx
        return _context

"""Background threads for control and progress work.

vLLM's CPU worker pins its process to the compute cores; threads it starts inherit
that, so our control thread would queue behind OpenMP compute and a lease RPC could
take seconds. These threads are mostly asleep, so they may run on any of the cores the
process was given (`process_cores`) — never beyond them: an operator who runs two CPU vLLM
instances on one host with `taskset` or `numactl --physcpubind` keeps each on its own cores.

The same goes for ZMQ's own I/O thread, which moves every byte of a context's sockets: started
from a pinned thread it sits on the compute core, and a message waits there however idle the
thread that reads it (a store lookup went unanswered for over 1 s, its server thread idle in
poll, while the prefill computed). So kvbridge's sockets share one context whose I/O threads
may run on any of the process's cores (`io_context`). Sharing it means a socket must never block that I/O thread: a
monitored socket's events must be read (consumer_link.py).
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import threading
from typing import Callable

import zmq

_context: zmq.Context | None = None
_context_lock = threading.Lock()


OPENMP_BINDING = ("OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")  # what vLLM sets before starting a CPU worker


def process_cores() -> set[int]:
    """The cores this process was given (by taskset, numactl or its pod's cpuset), before its compute threads
    were pinned to some of them: its main thread's, and where an OpenMP binding in its environment names the
    cores that thread is on (vLLM's CPU worker: its OpenMP runtime pinned the main thread as it loaded, before
    any of our code ran), also those of the parent that started it, whose own main thread runs no OpenMP
    compute. A binding that names other cores (a variable inherited, not applied) adds nothing."""
    try:
        cores = os.sched_getaffinity(os.getpid())
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))
    parent = os.getppid()
    if parent > 1 and any(cores <= _named_cores(os.environ.get(k, "")) for k in OPENMP_BINDING):
        try:
            cores |= os.sched_getaffinity(parent)
        except OSError:  # the parent is gone: its cores with it
            pass
    return cores


def _named_cores(binding: str) -> set[int]:
    """The cores an OpenMP binding names in the forms vLLM writes: '1 2 3' (GOMP_CPU_AFFINITY), '{1,2,3}'
    (OMP_PLACES), 'granularity=fine,explicit,proclist=[1,2,3]' (KMP_AFFINITY), ranges such as '0-3' too."""
    named: set[int] = set()
    for lo, hi in re.findall(r"(\d+)(?:-(\d+))?", binding):
        named.update(range(int(lo), int(hi or lo) + 1))
    return named


def widen_affinity() -> None:
    """Let the calling thread run on any of the process's cores (`process_cores`)."""
    try:
        os.sched_setaffinity(0, process_cores())
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
    """What each kvbridge background thread does first: any of the process's cores, and its name ('kvbridge-x'
    shows as 'kvb-x')."""
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
    """kvbridge's ZMQ context (one per process), its I/O threads free to run on any of the process's cores."""
    global _context
    with _context_lock:
        if _context is None:
            ctx = zmq.Context()
            for cpu in sorted(process_cores()):
                ctx.set(zmq.THREAD_AFFINITY_CPU_ADD, cpu)  # before the first socket starts the I/O thread
            _context = ctx
        return _context

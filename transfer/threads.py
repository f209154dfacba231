"""Background threads for control and progress work.

vLLM's CPU worker pins its process to the compute cores; threads it starts inherit
that, so our control thread would queue behind OpenMP compute and a lease RPC could
take seconds. These threads are mostly asleep, so they may run on any core.
"""
from __future__ import annotations

import os
import threading
from typing import Callable


def widen_affinity() -> None:
    """Let the calling thread run on any core."""
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError):
        pass  # not Linux, or not allowed: keep the inherited set


def start_io_thread(target: Callable[[], None], name: str) -> threading.Thread:
    def run() -> None:
        widen_affinity()
        target()

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t

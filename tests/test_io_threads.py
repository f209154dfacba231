"""kvbridge's background threads run on any core and carry their names where the OS shows threads, so an
operator reading `top -H` on a vLLM worker sees which threads are kvbridge's and what each costs."""
from __future__ import annotations

import os
import threading

from transfer.threads import start_io_thread


def test_a_background_thread_is_named_for_the_os_and_may_run_on_any_core():
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})  # a pinned caller, as vLLM's worker is
    try:
        seen: dict[str, object] = {}
        done = threading.Event()

        def body() -> None:
            seen["comm"] = open(f"/proc/self/task/{threading.get_native_id()}/comm").read().strip()
            seen["cores"] = os.sched_getaffinity(0)
            done.wait(5)
        t = start_io_thread(body, "kvbridge-producer")
        while "cores" not in seen:
            threading.Event().wait(0.01)
        done.set()
        t.join(5)
    finally:
        os.sched_setaffinity(0, before)
    assert seen["comm"] == "kvb-producer"
    assert seen["cores"] == set(range(os.cpu_count() or 1))

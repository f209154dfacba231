"""kvbridge's background threads run on any of the cores their process was given, never beyond them, and carry
their names where the OS shows threads, so an operator reading `top -H` on a vLLM worker sees which threads are
kvbridge's and what each costs."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from transfer.threads import start_io_thread

ROOT = Path(__file__).resolve().parent.parent
OPENMP_BINDING = ("OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")


def cores_of_a_new_io_thread() -> tuple[str, set[int]]:
    """(the OS's name, the cores) of a kvbridge thread started from the calling thread."""
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
    return seen["comm"], seen["cores"]  # type: ignore[return-value]


def test_a_thread_started_from_an_openmp_pinned_worker_runs_on_the_cores_its_parent_gave_it(monkeypatch):
    """vLLM starts its CPU worker with an OpenMP binding, which pins the worker's main thread to the compute
    cores as the runtime loads; a kvbridge thread started from it may run on every core the worker's parent had."""
    monkeypatch.setenv("GOMP_CPU_AFFINITY", "0")
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        comm, cores = cores_of_a_new_io_thread()
    finally:
        os.sched_setaffinity(0, before)
    assert comm == "kvb-producer"
    assert cores == os.sched_getaffinity(os.getppid()) | {0}


PROBE = """
import os
from tests.test_io_threads import cores_of_a_new_io_thread
print(sorted(cores_of_a_new_io_thread()[1]))
"""


def test_a_thread_of_a_process_started_on_some_cores_stays_on_them():
    """`taskset -c N vllm serve ...` (or numactl --physcpubind) keeps every kvbridge thread of that server on N."""
    last = max(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_BINDING}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env=env, check=True, preexec_fn=lambda: os.sched_setaffinity(0, {last})).stdout
    assert out.strip() == str([last])

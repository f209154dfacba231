"""In a real vLLM CPU worker, whose main thread the OpenMP runtime pins to the compute core, kvbridge's threads
run on the cores the worker's parent (EngineCore) was given, not only on the compute core: vLLM's worker really is
started the way tests/test_io_threads.py's probes are (there, a restricted server's threads are shown to stay
within its cores)."""
from __future__ import annotations

import os

from bench.confine import process_group_tasks


def cores(tid: int) -> set[int]:
    return os.sched_getaffinity(tid)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("PPid:")))


def test_kvbridge_threads_of_a_vllm_worker_run_on_its_parents_cores_not_only_the_compute_core(servers):
    seen = {}
    for pid, tid in process_group_tasks(os.getpgid(servers["decode"].proc.pid)):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            if name.startswith("kvb-"):
                seen[name] = (pid, cores(tid))
        except OSError:  # a thread that ended while listed
            continue
    assert "kvb-consumer" in seen, f"no kvbridge consumer thread in the decode node's processes: {sorted(seen)}"
    pid, got = seen["kvb-consumer"]
    assert cores(pid) == {1}, "the worker's main thread is on the decode's compute core (VLLM_CPU_OMP_THREADS_BIND)"
    assert got == {1} | cores(parent_of(pid)), (got, cores(parent_of(pid)))

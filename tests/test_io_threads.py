"""kvbridge's background threads, and the I/O threads of its ZMQ context, run on any of the cores their process was
given, never beyond them, and carry their names where the OS shows threads, so an operator reading `top -H` on a
vLLM worker sees which threads are kvbridge's and what each costs.

vLLM starts its CPU worker with an OpenMP binding in its environment (GOMP_CPU_AFFINITY and the like), and the
OpenMP runtime pins the worker's main thread to the compute cores as it loads: kvbridge's threads started from it
must not queue behind compute there (a message waited over 1 s), so they take the cores of the worker's parent.
Each case runs in a probe process (tests/thread_probe.py) that pins itself as taskset or the runtime would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from transfer.threads import OPENMP_BINDING

ROOT = Path(__file__).resolve().parent.parent
GIVEN = os.sched_getaffinity(0)  # the cores this test process (every probe's first parent) runs on
FIRST, LAST = min(GIVEN), max(GIVEN)


def probe(*cores: str, binding: str | None = None) -> dict:
    """What tests/thread_probe.py saw, started with `cores` as its arguments and, if given, GOMP_CPU_AFFINITY."""
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_BINDING}
    if binding is not None:
        env["GOMP_CPU_AFFINITY"] = binding
    done = subprocess.run([sys.executable, "-m", "tests.thread_probe", *cores], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)
    assert done.returncode == 0, f"the probe failed ({done.returncode}):\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_background_thread_is_named_for_the_os():
    assert probe(str(FIRST))["comm"] == "kvb-probe"


def test_threads_of_a_process_started_on_some_cores_stay_on_them():
    """`taskset -c N vllm serve ...` (or numactl --physcpubind) keeps every kvbridge thread of that server on N."""
    seen = probe(str(LAST))
    assert seen["io"] == [LAST] and seen["zmq"] == [[LAST]], seen


def test_threads_started_from_an_openmp_pinned_worker_run_on_every_core_its_parent_had():
    seen = probe(str(FIRST), binding=str(FIRST))
    assert seen["io"] == sorted(GIVEN) and seen["zmq"] == [sorted(GIVEN)], seen


def test_threads_of_an_openmp_pinned_worker_stay_within_its_parents_cores():
    seen = probe(str(LAST), str(LAST), binding=str(LAST))  # the worker's parent runs on LAST only
    assert seen["io"] == [LAST] and seen["zmq"] == [[LAST]], seen


def test_an_inherited_openmp_binding_that_names_other_cores_adds_nothing():
    """A user's exported OMP variable, not what pinned this process, must not let it escape its taskset."""
    seen = probe(str(LAST), binding=str(FIRST) if FIRST != LAST else "")
    assert seen["io"] == [LAST] and seen["zmq"] == [[LAST]], seen

"""kvbridge's ZMQ I/O threads run on any of the cores their process was given, even when the context is made
from a thread pinned to one core (vLLM's CPU worker pins its threads to the compute cores, and a message then
waited behind compute), and never beyond them."""
from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import glob, os, sys, time, zmq
from transfer.threads import io_context
if sys.argv[1:] == ["pinned"]:
    os.sched_setaffinity(0, {0})  # as a vLLM CPU worker's thread is, on its compute core
sock = io_context().socket(zmq.REP)
sock.bind_to_random_port("tcp://127.0.0.1")
def io_threads():
    return [t for t in glob.glob(f"/proc/{os.getpid()}/task/*") if open(t + "/comm").read().startswith("ZMQbg/IO")]
end = time.monotonic() + 10
while not io_threads() and time.monotonic() < end:  # the I/O thread names itself once it runs
    time.sleep(0.01)
for task in glob.glob(f"/proc/{os.getpid()}/task/*"):
    with open(task + "/comm") as f:
        name = f.read().strip()
    if name.startswith("ZMQbg/IO"):
        print(sorted(os.sched_getaffinity(int(task.rsplit("/", 1)[1]))))
sock.close()
"""


OPENMP_BINDING = ("OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")


def io_thread_cores(args: list[str], env: dict[str, str], cores: set[int]) -> list[str]:
    """The cores of each ZMQ I/O thread of a probe started on `cores` with `env`, one line each."""
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env, check=True,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores)).stdout.strip().splitlines()


def test_zmq_io_threads_of_an_openmp_pinned_worker_may_run_on_every_core_its_parent_had():
    given = os.sched_getaffinity(0)
    lines = io_thread_cores(["pinned"], dict(os.environ, GOMP_CPU_AFFINITY="0"), given)
    assert lines and all(line == str(sorted(given)) for line in lines), (lines, given)


def test_zmq_io_threads_of_a_process_started_on_some_cores_stay_on_them():
    last = max(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_BINDING}
    lines = io_thread_cores([], env, {last})
    assert lines and all(line == str([last]) for line in lines), lines

"""kvbridge's ZMQ I/O threads run on any core, even when the context is made from a thread pinned to one
core (vLLM's CPU worker pins its threads to the compute cores, and a message then waited behind compute)."""
from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import glob, os, time, zmq
from transfer.threads import io_context
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


def test_zmq_io_threads_of_kvbridge_sockets_may_run_on_every_core():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True).stdout
    every = str(list(range(os.cpu_count() or 1)))  # every core of the machine, whatever pins this process
    assert out.strip() and all(line == every for line in out.strip().splitlines()), (out, every)

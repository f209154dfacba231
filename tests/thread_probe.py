"""A process whose kvbridge threads' cores the tests read: `python -m tests.thread_probe CORES [CHILD_CORES]`.

It pins its main thread to CORES (comma-separated), as taskset or an OpenMP runtime would, then prints the cores
of a kvbridge thread it starts (`io`, its name for the OS `comm`) and the distinct core sets of its ZMQ context's
I/O threads (`zmq`), one JSON line. Given CHILD_CORES it instead runs the probe again from there on those cores,
so the probe's parent is a process on CORES.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import threading
import time

import zmq


def main() -> int:
    cores, child = sys.argv[1], sys.argv[2:]
    os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
    if child:
        return subprocess.run([sys.executable, "-m", "tests.thread_probe", *child], timeout=60).returncode
    from transfer.threads import io_context, start_io_thread
    seen: dict[str, object] = {}
    done = threading.Event()

    def body() -> None:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            seen["comm"] = f.read().strip()
        seen["io"] = sorted(os.sched_getaffinity(0))
        done.wait(5)
    t = start_io_thread(body, "kvbridge-probe")
    sock = io_context().socket(zmq.REP)
    sock.bind_to_random_port("tcp://127.0.0.1")
    end = time.monotonic() + 10
    while time.monotonic() < end and not ("io" in seen and zmq_io_threads()):  # the I/O thread names itself
        time.sleep(0.01)
    done.set()
    t.join(5)
    seen["zmq"] = sorted({tuple(sorted(os.sched_getaffinity(tid))) for tid in zmq_io_threads()})  # distinct sets
    sock.close()
    print(json.dumps(seen))
    return 0


def zmq_io_threads() -> list[int]:
    """The ZMQ I/O threads' ids. A thread that ends while this looks (the probe's own thread, joined a moment
    before, leaves /proc only as the kernel finishes it) is not one of them: it is skipped."""
    tids = []
    for task in glob.glob(f"/proc/{os.getpid()}/task/*"):
        try:
            with open(task + "/comm") as f:
                if f.read().startswith("ZMQbg/IO"):
                    tids.append(int(task.rsplit("/", 1)[1]))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return tids


if __name__ == "__main__":
    sys.exit(main())

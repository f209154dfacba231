"""Every thread of a server's processes confined to some cores, as a pod's cpuset confines a node.

On this 2-core box a PD pair shares the machine: prefill on core 0, decode on core 1, by their compute threads'
binding only. Their other threads (vLLM's EngineCore, API server, NIXL's and ours) run wherever the kernel puts
them: a node busy after its request was answered (NixlConnector's prefill steps its engine until the decode
has read the KV, then its worker busy-polls for 1 s) takes CPU from the other node's threads, and a node's own
threads (kvbridge's producer pushing) may run on the other node's core, neither of which two hosts would allow.
Threads created later inherit the confinement of the thread that creates them.
"""
from __future__ import annotations

import os

from launch.process_handle import ProcessHandle


def process_group_tasks(pgid: int) -> list[tuple[int, int]]:
    """(pid, tid) of every thread of every process in process group `pgid` (a server and the processes it started)."""
    tasks = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if os.getpgid(int(p)) == pgid:
                tasks += [(int(p), int(t)) for t in os.listdir(f"/proc/{p}/task")]
        except (OSError, ProcessLookupError):  # gone while listed
            continue
    return tasks


def confine(server: ProcessHandle, cores: set[int]) -> int:
    """Confine every thread of a started server to `cores`; how many threads were confined."""
    done = 0
    for _, tid in process_group_tasks(os.getpgid(server.proc.pid)):
        try:
            os.sched_setaffinity(tid, cores)
            done += 1
        except OSError:  # exited since it was listed
            continue
    return done

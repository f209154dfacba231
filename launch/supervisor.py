"""Starts the processes of a deployment, waits for health, and stops them all, leaving none behind.

Each child is a ProcessHandle in its own process group, so vLLM's engine and worker processes go
down with their API server on stop, on Ctrl-C, on SIGTERM and on SIGHUP (the terminal or SSH session that
ran `kvbridge up` went away: the children, in sessions of their own, would otherwise hold GPUs and ports).
"""
from __future__ import annotations

import logging
import signal
import sys
import time

from launch.polling import wait_for
from launch.process_handle import ProcessHandle

log = logging.getLogger("kvbridge.supervisor")


class Supervisor:
    def __init__(self) -> None:
        self.processes: list[ProcessHandle] = []

    def start(self, process: ProcessHandle) -> None:
        process.start()
        self.processes.append(process)

    def wait_healthy(self, timeout_s: float = 600) -> None:
        """Wait for every process at once: servers load in parallel, and one that exits while the others
        are still loading stops the wait at once (with its log's tail)."""
        pending = list(self.processes)

        def all_healthy() -> bool:
            for p in list(pending):
                if p.is_ready():
                    log.info("%s is healthy", p.name)
                    pending.remove(p)
            return not pending
        try:
            wait_for(all_healthy, timeout_s, interval=1)
        except TimeoutError:
            raise TimeoutError(f"not healthy after {timeout_s}s: {sorted(p.name for p in pending)}") from None

    def stop(self) -> None:
        """SIGTERM to all first, so they shut down together within one grace period."""
        for p in self.processes:
            p.terminate()
        end = time.monotonic() + 20
        for p in self.processes:
            p.wait_stopped(max(0.1, end - time.monotonic()))
        log.info("all processes stopped")

    def __enter__(self) -> Supervisor:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is not signal.SIG_IGN:  # `nohup kvbridge up`: logging out must stop nothing
                signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Starts the processes of a deployment, waits for health, and stops them all, leaving none behind.

Each child runs in its own process group, so vLLM's engine and worker processes go
down with their API server on stop, on Ctrl-C and on SIGTERM.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

log = logging.getLogger("kvbridge.supervisor")


class Supervisor:
    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.urls: dict[str, str] = {}

    def start(self, name: str, cmd: list[str], health_url: str, env: dict[str, str] | None = None) -> None:
        out = open(self.log_dir / f"{name}.log", "ab")
        full_env = dict(os.environ, **(env or {}))
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), full_env.get("PYTHONPATH")]))
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                            start_new_session=True)
        self.urls[name] = health_url
        log.info("started %s (pid %d), log %s", name, self.procs[name].pid, self.log_dir / f"{name}.log")

    def wait_healthy(self, timeout_s: float = 600) -> None:
        end = time.monotonic() + timeout_s
        pending = dict(self.urls)
        while pending:
            for name, url in list(pending.items()):
                p = self.procs[name]
                if p.poll() is not None:
                    tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{name} exited with code {p.returncode} while starting:\n{tail}")
                try:
                    with urllib.request.urlopen(url, timeout=2) as r:
                        if r.status == 200:
                            log.info("%s is healthy", name)
                            del pending[name]
                except OSError:
                    pass
            if time.monotonic() > end:
                raise TimeoutError(f"not healthy after {timeout_s}s: {sorted(pending)}")
            time.sleep(1)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + 20
        for name, p in self.procs.items():
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time: killing", name)
            try:
                os.killpg(p.pid, signal.SIGKILL)  # whatever is left of its group
            except ProcessLookupError:
                pass
            p.wait()
        log.info("all processes stopped")

    def __enter__(self) -> Supervisor:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

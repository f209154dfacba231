"""One server process as kvbridge starts it, for `kvbridge up`, the tests and the benches alike.

The child runs in its own session (its own process group), so a stop takes vLLM's engine and
worker processes down with the API server instead of leaving them holding ports and cores. Its
output goes to a log file; a restart appends to it, so one file tells a server's whole story
across incarnations (a restart runs the same command line: a new incarnation at the same address).
"""
from __future__ import annotations

import http.client
import logging
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

from launch.netns import entered
from launch.polling import wait_for

log = logging.getLogger("kvbridge.process")

# The checkout (or install) this package lives in: children import kvbridge's packages from here, so
# `pd.connector` inside vLLM is the same code as the launcher that started it.
ROOT = Path(__file__).resolve().parent.parent


class ProcessHandle:
    """Start, health-wait, stop and kill one command, with its output in `log_dir/<name>.log`."""

    def __init__(self, name: str, cmd: list[str], health_url: str, env: dict[str, str] | None,
                 log_dir: str | Path, keep_old_log: bool = False, namespace: str | None = None) -> None:
        """`keep_old_log`: the first start appends too (`kvbridge up` keeps a user's earlier runs);
        otherwise the first start begins a fresh log, so a bench that reads its servers' logs
        reads this run only. `namespace`: run inside that network namespace (launch/netns.py), where
        the health URL is then asked too."""
        self.name = name
        self.namespace = namespace
        self.cmd = ["ip", "netns", "exec", namespace, *cmd] if namespace else cmd
        self.health_url = health_url
        self.env = dict(env or {})
        self.log_path = Path(log_dir) / f"{name}.log"
        self.keep_old_log = keep_old_log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start, or restart after stop()/kill9() with the same command line, ports included."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with open(self.log_path, "ab" if self.proc or self.keep_old_log else "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        log.info("started %s (pid %d), log %s", self.name, self.proc.pid, self.log_path)

    def is_ready(self) -> bool:
        """True once the health URL answers 200. Raises, with the log's tail, if the process has exited:
        a server that dies while loading should fail the caller at once, not at its timeout."""
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode} while starting; "
                               f"see {self.log_path}:\n{tail}")
        try:
            with entered(self.namespace), urllib.request.urlopen(self.health_url, timeout=2) as r:
                return r.status == 200
        except (OSError, http.client.HTTPException):  # not listening yet, or 503 while it warms up
            return False

    def wait_ready(self, timeout: float = 600) -> None:
        wait_for(self.is_ready, timeout, interval=0.5, what=f"{self.name} healthy at {self.health_url} "
                                                           f"(log {self.log_path})")

    def terminate(self) -> None:
        """SIGTERM to the whole group, without waiting: stopping many servers at once takes one grace period."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)

    def wait_stopped(self, timeout: float) -> None:
        """After terminate(): wait up to `timeout` s, then SIGKILL whatever is left of the group (an engine
        process can outlive its API server)."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %g s: killing", self.name, timeout)
        self._signal_group(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 20) -> None:
        self.terminate()
        self.wait_stopped(timeout)

    def kill9(self) -> None:
        """kill -9 of the whole group, as a node that crashes: nothing gets to clean up or say goodbye."""
        self._signal_group(signal.SIGKILL)
        self.proc.wait(10)

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:  # the group is already gone
            pass

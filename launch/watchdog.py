"""Keeps a deployment's roles running under `kvbridge up`: a role that exits, or that stops answering
/health after it was healthy, is restarted with exponential backoff; one that keeps failing is given up
on with a message that says so, and the other roles keep serving.

The router needs nothing from here: it health-checks every node and takes a restarted one back once its
/health answers (same ports, same command line: ProcessHandle.start restarts an incarnation).
"""
from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from launch.netns import entered
from launch.process_handle import ProcessHandle
from launch.servers import RouterServer

log = logging.getLogger("kvbridge.watchdog")
RESTARTS = Counter("kvbridge_supervisor_restarts_total", "Restarts of a role by `kvbridge up`", ["role"])
GIVEN_UP = Gauge("kvbridge_supervisor_given_up", "1 once `kvbridge up` stopped restarting a role", ["role"])


def _answers_http(url: str, namespace: str | None = None) -> bool:
    """Any HTTP answer: the router's /health is 503 while no decode node is up, which is its backends'
    state, not its own, and restarting it would not help."""
    try:
        with entered(namespace), urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@dataclass
class RestartPolicy:
    """`max_restarts` within `window_s` and the role is given up on; `start_timeout_s` is how long a
    (re)started role may take to answer /health before that counts as a failure."""
    max_restarts: int = 5
    window_s: float = 600.0
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    unhealthy_after: int = 3
    start_timeout_s: float = 600.0


@dataclass
class _Watch:
    proc: ProcessHandle
    started_at: float
    healthy_once: bool = False
    health_fails: int = 0
    restart_at: float | None = None
    restart_times: list[float] = field(default_factory=list)
    given_up: bool = False


class Watchdog:
    def __init__(self, processes: list[ProcessHandle], policy: RestartPolicy | None = None) -> None:
        self.policy = policy or RestartPolicy()
        now = time.monotonic()
        self._watches = [_Watch(p, now, healthy_once=True) for p in processes]   # started healthy by up
        self.restarts: dict[str, int] = {p.name: 0 for p in processes}
        for p in processes:   # every role's series exists from the start, at 0
            RESTARTS.labels(p.name)
            GIVEN_UP.labels(p.name).set(0)

    @property
    def given_up(self) -> list[str]:
        return [w.proc.name for w in self._watches if w.given_up]

    def tick(self) -> None:
        """One round: check every role, restart those due. Called about once a second."""
        now = time.monotonic()
        for w in self._watches:
            if w.given_up:
                continue
            if w.restart_at is not None:
                if now >= w.restart_at:
                    self._restart(w, now)
                continue
            why = self._failure(w, now)
            if why:
                self._schedule(w, now, why)

    def _failure(self, w: _Watch, now: float) -> str:
        """Why the role needs a restart, or '' when it is fine (or still starting within its time)."""
        code = w.proc.proc.poll()
        if code is not None:
            return f"exited with code {code}"
        try:
            ok = w.proc.is_ready() or (isinstance(w.proc, RouterServer)
                                       and _answers_http(w.proc.health_url, w.proc.namespace))
        except RuntimeError:   # exited between the poll and the probe
            return "exited"
        if ok:
            w.healthy_once, w.health_fails = True, 0
            return ""
        if not w.healthy_once:
            return "" if now - w.started_at < self.policy.start_timeout_s else \
                f"not healthy {self.policy.start_timeout_s:g} s after starting"
        w.health_fails += 1
        return f"/health failed {w.health_fails} times in a row" if w.health_fails >= self.policy.unhealthy_after else ""

    def _schedule(self, w: _Watch, now: float, why: str) -> None:
        p = self.policy
        w.restart_times = [t for t in w.restart_times if now - t < p.window_s]
        if len(w.restart_times) >= p.max_restarts:
            w.given_up = True
            GIVEN_UP.labels(w.proc.name).set(1)
            w.proc.stop(5)
            log.error("%s %s; giving up on it after %d restarts in %g s (see %s). The rest of the deployment "
                      "keeps serving without it", w.proc.name, why, len(w.restart_times), p.window_s, w.proc.log_path)
            return
        delay = min(p.max_backoff_s, p.backoff_s * 2 ** len(w.restart_times))
        w.restart_at = now + delay
        w.proc.stop(5)   # a hung role is killed, so the restart gets its ports
        log.warning("%s %s; restarting in %g s (restart %d, %d allowed in %g s; log %s)", w.proc.name, why, delay,
                    len(w.restart_times) + 1, p.max_restarts, p.window_s, w.proc.log_path)

    def _restart(self, w: _Watch, now: float) -> None:
        w.restart_times.append(now)
        w.restart_at, w.started_at, w.healthy_once, w.health_fails = None, now, False, 0
        self.restarts[w.proc.name] += 1
        RESTARTS.labels(w.proc.name).inc()
        w.proc.start()

"""What the connector's hooks cost the engine loop: time per hook, per step, in every process.

vLLM calls the connector on every engine step, including every decode step of every running request, so
a microsecond here is paid on each token. Each process (scheduler and worker are separate processes)
adds its hooks' time to plain counters (exported to Prometheus when scraped) and, every `every_s` (10),
logs the mean cost per step over the window ("connector hooks: 4.1 us/step over 812 steps
(get_transfer_results 1.9, ...)"), which the benchmarks read. Time a hook spends deliberately asleep (an
idle decode engine waiting for KV instead of spinning through empty steps) is reported apart, as `idle wait`:
it is not a cost to any request.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Iterator, TypeVar

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("kvbridge.hooks")
F = TypeVar("F", bound=Callable)
_TIMERS: list[HookTimer] = []


class HookTimer:
    """Accumulates hook time; `step_hook` names the hook called once per engine step in this process.

    Counting must cost less than what it counts: a hook call adds to plain integers only, which the Prometheus
    collector below reads when scraped. Measured here: a Prometheus increment per call made the wrapper cost
    2.6 us per hook, more than the empty hooks it timed (0.3-0.6 us)."""

    def __init__(self, step_hook: str, every_s: float = 10.0, clock=time.perf_counter_ns) -> None:
        self.step_hook = step_hook
        self.every_ns = int(every_s * 1e9)
        self._clock = clock
        self.totals: dict[str, list[int]] = {}  # hook -> [ns, calls] since the start
        self._window: dict[str, int] = {}  # ns per hook since the last log line
        self._idle_ns = 0  # asleep on purpose inside the current window's hooks
        self._steps = 0
        self._since = clock()
        self.hooks: set[str] = set()  # the names wrapped by `timed`
        _TIMERS.append(self)

    def idle(self, ns: int) -> None:
        """A hook slept `ns` on purpose (nothing to compute); not counted as its cost."""
        self._idle_ns += ns

    def add(self, hook: str, ns: int, now: int) -> None:
        """`ns` spent in `hook`, which ended at `now` (this timer's clock)."""
        total = self.totals.get(hook)
        if total is None:
            self.totals[hook] = [ns, 1]
        else:
            total[0] += ns
            total[1] += 1
        self._window[hook] = self._window.get(hook, 0) + ns
        if hook == self.step_hook:
            self._steps += 1
            if now - self._since >= self.every_ns:
                self._report(now)

    def _report(self, now: int) -> None:
        if self._steps:
            total = sum(self._window.values()) / self._steps / 1e3
            parts = ", ".join(f"{h} {ns / self._steps / 1e3:.1f}" for h, ns in sorted(self._window.items()))
            log.info("connector hooks: %.1f us/step over %d steps (%s); idle wait %.1f us/step", total, self._steps,
                     parts, self._idle_ns / self._steps / 1e3)
        self._window, self._steps, self._since, self._idle_ns = {}, 0, now, 0

    def timed(self, fn: F) -> F:
        """Wrap a connector method so its time is counted under its name."""
        name = fn.__name__
        self.hooks.add(name)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0, idle0 = self._clock(), self._idle_ns
            try:
                return fn(*args, **kwargs)
            finally:
                end = self._clock()
                slept = self._idle_ns - idle0 if self._idle_ns >= idle0 else 0
                self.add(name, end - t0 - slept, end)
        return wrapper  # type: ignore[return-value]


class _HookCollector(Collector):
    """`kvbridge_connector_hook_seconds_total` and `..._calls_total` by hook, read from every timer at scrape time
    (the engine thread may add meanwhile: a scrape sees each hook's sum and count within a call of each other)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        seconds = CounterMetricFamily("kvbridge_connector_hook_seconds", "Time spent inside connector hooks",
                                      labels=["hook"])
        calls = CounterMetricFamily("kvbridge_connector_hook_calls", "Connector hook calls", labels=["hook"])
        summed: dict[str, list[int]] = {}
        for timer in list(_TIMERS):
            for hook, (ns, n) in list(timer.totals.items()):
                acc = summed.setdefault(hook, [0, 0])
                acc[0], acc[1] = acc[0] + ns, acc[1] + n
        for hook, (ns, n) in sorted(summed.items()):
            seconds.add_metric([hook], ns / 1e9)
            calls.add_metric([hook], n)
        yield seconds
        yield calls


REGISTRY.register(_HookCollector())
SCHEDULER_HOOKS = HookTimer("build_connector_meta")  # the scheduler process: one build per engine step
WORKER_HOOKS = HookTimer("bind_connector_metadata")  # a worker process: one bind per engine step


def time_peer_hooks(cls: type) -> None:
    """Wrap a bench peer connector's hooks in the timers kvbridge's facade times its own with, each in the same
    timer, so every connector in bench/hook_cost.py pays the same price for being measured."""
    import pd.connector  # noqa: F401  its decorators name the hooks (imported here: it imports this module)
    for timer in (WORKER_HOOKS, SCHEDULER_HOOKS):
        for name in sorted(timer.hooks):
            setattr(cls, name, timer.timed(getattr(cls, name)))

"""The connector's per-step cost is measured where vLLM pays it: every hook's time counted, and the mean per
engine step logged once per window (the benchmarks read that line)."""
from __future__ import annotations

import logging

from pd.hook_timer import HOOK_CALLS, HookTimer


class Clock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def test_hooks_are_timed_and_the_mean_per_step_is_logged_once_per_window(caplog):
    clock = Clock()
    timer = HookTimer("step", every_s=1.0, clock=clock)

    @timer.timed
    def step() -> None:
        clock.ns += 3_000  # 3 us inside the hook

    @timer.timed
    def other() -> str:
        clock.ns += 1_000
        clock.ns += 50_000  # then asleep on purpose: nothing to compute
        timer.idle(50_000)
        return "kept"

    calls_before = HOOK_CALLS.labels("step")._value.get()
    with caplog.at_level(logging.INFO, logger="kvbridge.hooks"):
        for _ in range(4):
            assert other() == "kept"
            step()
        assert not caplog.records  # the window has not passed yet
        clock.ns += 1_000_000_000
        step()
    assert HOOK_CALLS.labels("step")._value.get() - calls_before == 5
    (line,) = [r.getMessage() for r in caplog.records]
    # 4 x (3 + 1) us + 3 us over 5 steps
    assert line == "connector hooks: 3.8 us/step over 5 steps (other 0.8, step 3.0); idle wait 40.0 us/step"


def test_the_prometheus_counters_catch_up_once_per_flush_interval_not_on_every_call():
    clock = Clock()
    timer = HookTimer("flushed_step", every_s=10.0, clock=clock, flush_s=1.0)

    @timer.timed
    def flushed_step() -> None:
        clock.ns += 2_000

    def counted() -> float:
        return HOOK_CALLS.labels("flushed_step")._value.get()
    before = counted()
    for _ in range(3):
        flushed_step()
    assert counted() == before  # within the interval: plain integers only
    clock.ns += 1_000_000_000
    flushed_step()
    assert counted() == before + 4  # the whole interval's calls, at its first step after it ended

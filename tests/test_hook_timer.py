"""The connector's per-step cost is measured where vLLM pays it: every hook's time counted, and the mean per
engine step logged once per window (the benchmarks read that line)."""
from __future__ import annotations

import logging

from prometheus_client import REGISTRY

from pd.hook_timer import HookTimer


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

    calls_before = exported("calls", "step")
    with caplog.at_level(logging.INFO, logger="kvbridge.hooks"):
        for _ in range(4):
            assert other() == "kept"
            step()
        assert not caplog.records  # the window has not passed yet
        clock.ns += 1_000_000_000
        step()
    assert exported("calls", "step") - calls_before == 5
    (line,) = [r.getMessage() for r in caplog.records]
    # 4 x (3 + 1) us + 3 us over 5 steps
    assert line == "connector hooks: 3.8 us/step over 5 steps (other 0.8, step 3.0); idle wait 40.0 us/step"


def exported(kind: str, hook: str) -> float:
    return REGISTRY.get_sample_value(f"kvbridge_connector_hook_{kind}_total", {"hook": hook}) or 0.0


def test_a_scrape_sees_every_call_so_far_with_no_prometheus_work_per_call():
    clock = Clock()
    timer = HookTimer("scraped_step", every_s=10.0, clock=clock)

    @timer.timed
    def scraped_step() -> None:
        clock.ns += 2_000

    for _ in range(3):
        scraped_step()
    assert exported("calls", "scraped_step") == 3 and exported("seconds", "scraped_step") == 6e-6


def test_a_bench_peer_connector_is_timed_on_exactly_the_hooks_kvbridge_times():
    """bench/hook_cost.py compares connectors per engine step: a peer timed on other hooks, or a hook counted in
    the other process's timer (which logs at another step hook), would not compare."""
    import ast
    import pathlib

    from pd.hook_timer import SCHEDULER_HOOKS, WORKER_HOOKS, time_peer_hooks

    timers = {"SCHEDULER_HOOKS": SCHEDULER_HOOKS, "WORKER_HOOKS": WORKER_HOOKS}
    facade = ast.parse((pathlib.Path(__file__).parents[1] / "pd" / "connector.py").read_text())
    ours = {f.name: timers[ast.unparse(d).split(".")[0]] for f in ast.walk(facade) if isinstance(f, ast.FunctionDef)
            for d in f.decorator_list if ast.unparse(d).endswith("_HOOKS.timed")}

    class Peer:
        pass

    def calls() -> dict[tuple[str, str], int]:
        return {(name, t.step_hook): t.totals.get(name, [0, 0])[1] for name in ours for t in timers.values()}

    for name in ours:
        def hook(self) -> None:
            return None
        hook.__name__ = name
        setattr(Peer, name, hook)
    before = calls()
    time_peer_hooks(Peer)
    peer = Peer()
    for name in ours:
        getattr(peer, name)()
    counted = {key: n - before[key] for key, n in calls().items() if n != before[key]}
    assert len(ours) == 11 and counted == {(name, t.step_hook): 1 for name, t in ours.items()}

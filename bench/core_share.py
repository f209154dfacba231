"""Who uses which core while a PD request runs: per-thread CPU time of every server process, by core.

kvbridge's prefill leg measured slower than NixlConnector-best's on the same prompts (bench/pd_interleaved.py).
This runs aggregated vLLM (core 0), kvbridge prefill (core 0) + decode (core 1) and NixlConnector-best prefill +
decode, sends each prompt to each system one after the other (kvbridge twice: both legs at once, and the decode
leg after the prefill answered, the router's two `decode_dispatch` orders), and while each request runs samples
every thread of every server every 20 ms (/proc: CPU ticks, the core it last ran on, its allowed cores). Prints
per request the legs' times, vLLM's own queue / prefill / end-to-end times on the node that prefilled, and the
threads that used CPU: name (kvbridge's threads are named kvb-*), allowed cores, ms on core 0 and on core 1.

This is how the cause was found: with both legs at once, the idle decode node's engine steps without pause while
its request waits for KV (EngineCore and Worker together over a core), and the prefill on the other core computed
10-30 % more slowly, even with every thread of each node confined to its own core (`--confine`).

    python -m bench.core_share [--lengths 1000] [--repeats 3] [--confine] [--plain]
"""
from __future__ import annotations

import argparse
import os
import random
import re
import threading
import time

import requests
from collections import defaultdict

from bench.confine import confine, process_group_tasks
from bench.pd_bench import MODEL, ExposedTimes, kvbridge_once, nixl_once
from bench.streamed import stream_ttft
from bench.pd_interleaved import start_side_by_side
from launch.local_servers import free_port
from launch.tiny_model import make_tiny_model

TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")
ENGINE_TIMES = ("queue_time", "prefill_time", "inference_time", "e2e_request_latency")


def engine_times(url: str) -> dict[str, float]:
    """vLLM's own per-request histograms' sums (seconds): waiting, prefill, inference, end to end."""
    text = requests.get(url + "/metrics", timeout=10).text
    out = {}
    for name in ENGINE_TIMES:
        m = re.search(rf"^vllm:(?:request_)?{name}_seconds_sum\{{[^}}]*\}} ([\d.e+-]+)$", text, re.M)
        out[name] = float(m.group(1)) if m else float("nan")
    return out


def group_threads(pgid: int) -> dict[tuple[int, int], tuple[str, int, int, str]]:
    """(pid, tid) -> (thread name, CPU ticks, last core, allowed cores) for every thread in process group."""
    out = {}
    for p, t in process_group_tasks(pgid):
        try:
            st = open(f"/proc/{p}/task/{t}/stat").read()
            allowed = [ln for ln in open(f"/proc/{p}/task/{t}/status") if ln.startswith("Cpus_allowed_list")]
        except OSError:  # exited since it was listed
            continue
        f = st.rsplit(")", 1)[1].split()
        out[(p, t)] = (st[st.index("(") + 1:st.rindex(")")], int(f[11]) + int(f[12]), int(f[36]),
                       allowed[0].split()[1] if allowed else "?")
    return out


class Sampler:
    """Samples the groups every `period` s; use() sums each thread's tick deltas by the core it was seen on."""

    def __init__(self, groups: dict[str, int], period: float = 0.02) -> None:
        self.groups, self.period = groups, period
        self.use: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = {g: group_threads(pg) for g, pg in self.groups.items()}
        while not self._stop.wait(self.period):
            for g, pg in self.groups.items():
                now = group_threads(pg)
                for k, (name, ticks, core, allowed) in now.items():
                    d = ticks - last[g].get(k, (name, ticks, core, allowed))[1]
                    if d:
                        self.use[(g, name, allowed)][min(core, 1)] += d * TICK_MS
                last[g] = now

    def __enter__(self) -> "Sampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def show(use: dict, system_groups: tuple[str, ...]) -> None:
    rows = sorted(((k, v) for k, v in use.items() if k[0] in system_groups), key=lambda kv: -sum(kv[1]))
    for (g, name, allowed), (c0, c1) in rows[:12]:
        print(f"      {g:5} {name[:22]:22} allowed {allowed:5} core0 {c0:7.0f} ms  core1 {c1:7.0f} ms")


def fresh(body: dict, k: int) -> dict:
    """The same length, no prefix shared with `body` (which the servers have cached by now) or another k."""
    return dict(body, prompt=[t + k for t in body["prompt"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settle", type=float, default=1.5, help="seconds between requests: an idle vLLM worker "
                    "busy-polls for 1 s after its last step, on its node's core")
    ap.add_argument("--plain", action="store_true", help="also each prefill node alone (max_tokens 1, no transfer)")
    ap.add_argument("--confine", action="store_true", help="every thread of a node on its node's core, as a pod's "
                    "cpuset would (aggregated and the prefills core 0, the decodes core 1)")
    args = ap.parse_args()
    make_tiny_model(MODEL, "bench")
    rng = random.Random(2)
    metrics_port = free_port()
    servers = start_side_by_side("cs", {}, metrics_port)
    exposed = ExposedTimes(f"http://127.0.0.1:{metrics_port}/metrics")
    s = servers
    systems = {"aggregated": (lambda b: stream_ttft(s["agg"].url, b), ("agg",)),
               "kvbridge, both legs at once": (lambda b: kvbridge_once(s["kp"], s["kd"], b, exposed, "with_prefill"),
                                               ("kp", "kd")),
               "kvbridge, decode leg after prefill": (lambda b: kvbridge_once(s["kp"], s["kd"], fresh(b, 1), exposed),
                                                      ("kp", "kd")),
               "nixl-best": (lambda b: nixl_once(s["np"], s["nd"], b), ("np", "nd")),
               # the prefill nodes alone, no transfer: what the node's connector costs its compute by being there
               "kvbridge prefill, plain": (lambda b: stream_ttft(s["kp"].url, dict(fresh(b, 2), max_tokens=1)), ("kp",)),
               "nixl-best prefill, plain": (lambda b: stream_ttft(s["np"].url, dict(fresh(b, 3), max_tokens=1)), ("np",))}
    try:
        for srv in servers.values():
            srv.wait_ready(900)
        groups = {k: os.getpgid(v.proc.pid) for k, v in servers.items()}
        if args.confine:
            for k, srv in servers.items():
                confine(srv, {1} if k in ("kd", "nd") else {0})
        warm = {"model": "tiny", "prompt": [rng.randrange(10, 1000) for _ in range(64)], "max_tokens": 2}
        for once, _ in systems.values():
            once(warm)
        for n in args.lengths:
            for rep in range(args.repeats):
                body = {"model": "tiny", "prompt": [rng.randrange(10, 1000) for _ in range(n)], "max_tokens": 32,
                        "temperature": 0}
                names = list(systems)  # the order rotates: no system always follows the same one
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    once, gs = systems[name]
                    if name.endswith("plain") and not args.plain:
                        continue
                    time.sleep(args.settle)
                    before = engine_times(servers[gs[0]].url)
                    with Sampler(groups) as sm:
                        t0 = time.perf_counter()
                        got = once(body)
                        wall = (time.perf_counter() - t0) * 1000
                    print(f"  {n} tokens {name}: TTFT {got.ttft * 1000:.1f} ms, wall {wall:.0f} ms; CPU by thread:")
                    after = engine_times(servers[gs[0]].url)
                    print("      " + gs[0] + " engine: " + ", ".join(
                        f"{k} {(after[k] - before[k]) * 1000:.0f} ms" for k in ENGINE_TIMES))
                    show(sm.use, tuple(servers))
    finally:
        for srv in servers.values():
            srv.stop()


if __name__ == "__main__":
    main()

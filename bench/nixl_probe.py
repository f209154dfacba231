"""Does vLLM's NixlConnector (prefill + decode, pull) survive many sequential requests in a given NIXL
configuration, and what does each node burn while idle? Finds the configuration bench/pd_bench.py can call
NixlConnector's best; on a stalled request it writes both workers' and engines' thread states (CPU use, kernel
wait, affinity) and, with KVB_NIXL_PYSTACKS=1 and pd.nixl_best, their Python stacks to the server logs.

    python -m bench.nixl_probe [--module pd.nixl_best] [--extra '{"num_threads": 0}'] [--env '{"KVB_NIXL_SYNC":
        "strict"}'] [--requests 21] [--lengths 128 1000 2000] [--timeout 60] [--idle-seconds 10]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import threading
import time

import requests

from bench.idle_cpu import busy, show
from bench.pd_bench import MODEL, NIXL, nixl_once, start
from launch.local_servers import free_port
from launch.tiny_model import make_tiny_model


def thread_states(pid: str) -> str:
    """Per thread: name, scheduler state, CPU ticks used over one second, kernel wait channel and stack."""
    def ticks() -> dict[str, tuple[str, str, int]]:
        out = {}
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                st = open(f"/proc/{pid}/task/{t}/stat").read()
            except OSError:
                continue
            f = st.rsplit(")", 1)[1].split()
            out[t] = (st[st.index("(") + 1:st.rindex(")")], f[0], int(f[11]) + int(f[12]))
        return out
    a = ticks()
    time.sleep(1)
    b = ticks()
    lines = [subprocess.run(["ps", "-eLo", "pid,tid,psr,cls,ni,stat,pcpu,comm", "--sort=-pcpu"], capture_output=True,
                            text=True).stdout[:3000], open(f"/proc/{pid}/status").read()[-600:],
             open(f"/proc/{pid}/sched").read()[:1500]]
    for t, (name, state, used) in sorted(b.items()):
        try:
            wchan = open(f"/proc/{pid}/task/{t}/wchan").read()
            kstack = open(f"/proc/{pid}/task/{t}/stack").read().replace("\n", " | ")
        except OSError:
            wchan, kstack = "?", "?"
        lines.append(f"{t} {name!r} {state} busy={used - a.get(t, (0, 0, used))[2]} wchan={wchan} {kstack}")
    return "\n".join(lines) + "\n"


def dump_stacks(label: str, pid: int, out_dir: str) -> None:
    """Thread states (and Python stacks, see the module docstring) of the vLLM processes in `pid`'s group."""
    pgid = os.getpgid(pid)
    for p in os.listdir("/proc"):
        if p.isdigit() and os.path.exists(f"/proc/{p}/stat"):
            try:
                fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            comm = open(f"/proc/{p}/comm").read().strip()
            if int(fields[2]) == pgid and comm.startswith("VLLM::") and os.environ.get("KVB_NIXL_PYSTACKS") == "1":
                for _ in range(3):  # pd.nixl_best's faulthandler: Python stacks to the log, three samples
                    os.kill(int(p), signal.SIGUSR2)
                    time.sleep(1)
            if int(fields[2]) == pgid and comm.startswith("VLLM::"):
                with open(os.path.join(out_dir, f"{label}-{p}.threads.txt"), "w") as f:
                    f.write(thread_states(p))
                print(f"    threads: {label}-{p}.threads.txt", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", default="", help="kv_connector_module_path (empty: vLLM's stock NixlConnector)")
    ap.add_argument("--extra", type=json.loads, default={}, help="kv_connector_extra_config")
    ap.add_argument("--env", type=json.loads, default={}, help="extra environment of both servers")
    ap.add_argument("--requests", type=int, default=21)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 1000, 2000])
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--dump-dir", default="/tmp/nixlprobe")
    a = ap.parse_args()
    if a.env.get("KVB_NIXL_PYSTACKS") == "1":
        os.environ["KVB_NIXL_PYSTACKS"] = "1"
    os.makedirs(a.dump_dir, exist_ok=True)
    make_tiny_model(MODEL, "bench")
    kv = dict(NIXL, kv_connector_extra_config=a.extra)
    if a.module:
        kv["kv_connector_module_path"] = a.module
    p = start("probe-prefill", kv_config=kv, env={"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
                                                  "VLLM_CPU_OMP_THREADS_BIND": "0", **a.env})
    d = start("probe-decode", kv_config=kv, env={"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
                                                 "VLLM_CPU_OMP_THREADS_BIND": "1", **a.env})
    rng = random.Random(1)
    ok, times = 0, []
    try:
        for s in (p, d):
            s.wait_ready(900)
        time.sleep(3)
        for k, v in busy({"prefill": p, "decode": d}, a.idle_seconds).items():
            show(f"idle CPU (cores), {k}", v)
        for i in range(a.requests):
            n = a.lengths[i % len(a.lengths)]
            body = {"model": "tiny", "prompt": [rng.randrange(10, 1000) for _ in range(n)], "max_tokens": 8,
                    "temperature": 0}
            t0 = time.perf_counter()
            # the stacks are taken while the request still waits: once the client gives up, vLLM aborts it
            watchdog = threading.Timer(a.timeout * 0.6, lambda: (dump_stacks("prefill", p.proc.pid, a.dump_dir),
                                                                  dump_stacks("decode", d.proc.pid, a.dump_dir)))
            watchdog.start()
            try:
                # nixl_once's timeouts are 120 s each; a watchdog thread is not needed for a probe: use ours
                r = _once_with_timeout(p, d, body, a.timeout)
            except requests.RequestException as e:
                print(f"  request {i} ({n} tokens) STALLED after {time.perf_counter() - t0:.1f} s: "
                      f"{type(e).__name__}: {e}", flush=True)
                watchdog.join()
                break
            finally:
                watchdog.cancel()
            ok += 1
            times.append((n, r[0] * 1000))
            print(f"  request {i} ({n} tokens): TTFT {r[0] * 1000:.1f} ms", flush=True)
        for k, v in busy({"prefill": p, "decode": d}, a.idle_seconds).items():
            show(f"idle CPU after requests (cores), {k}", v)
    finally:
        for s in (p, d):
            s.stop()
    print(f"RESULT {ok}/{a.requests} requests completed; logs {p.log_path} {d.log_path}")
    for n in a.lengths:
        got = [t for m, t in times if m == n]
        if got:
            print(f"  {n} tokens: median TTFT {statistics.median(got):.1f} ms over {len(got)}")


def _once_with_timeout(p, d, body: dict, timeout: float):
    """nixl_once with a shorter HTTP timeout (a stall shows sooner)."""
    import bench.pd_bench as pb
    real = pb.requests.post
    pb.requests.post = lambda *a, **k: real(*a, **dict(k, timeout=timeout))
    try:
        return nixl_once(p, d, body)
    finally:
        pb.requests.post = real


if __name__ == "__main__":
    main()

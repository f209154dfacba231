"""CPU a node burns while it has nothing to compute: kvbridge's producer and consumer (idle, and a consumer
waiting for KV that never comes) next to vLLM's NixlConnector and a plain aggregated server, same run.

    python bench/idle_cpu.py [--seconds 20]

Prints CPU-seconds per wall-second for each server's whole process group (API server, engine, worker):
1.0 means one core kept busy. On a 2-core box a node that spins a core takes it from the other node's compute.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
import uuid

import requests

from bench.pd_bench import NIXL
from launch.local_servers import MODEL_DIR, free_port, start_vllm
from launch.servers import VllmServer
from launch.tiny_model import make_tiny_model
from launch.tiny_prompts import random_token_prompt
from router.leg_bodies import decode_body


def group_cpu_s(pid: int) -> dict[str, float]:
    """User + system CPU seconds of every process in `pid`'s process group, by process name."""
    pgid, tick, out = os.getpgid(pid), os.sysconf("SC_CLK_TCK"), {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def busy(servers: dict[str, VllmServer], seconds: float) -> dict[str, dict[str, float]]:
    """CPU-seconds per second, by process name, for each server."""
    before = {k: group_cpu_s(s.proc.pid) for k, s in servers.items()}
    time.sleep(seconds)
    after = {k: group_cpu_s(s.proc.pid) for k, s in servers.items()}
    return {k: {n: (v - before[k].get(n, 0.0)) / seconds for n, v in after[k].items()} for k in servers}


def show(label: str, by_process: dict[str, float]) -> None:
    parts = ", ".join(f"{n} {v:.2f}" for n, v in sorted(by_process.items(), key=lambda kv: -kv[1]) if v >= 0.01)
    print(f"  {label:46} {sum(by_process.values()):5.2f}   ({parts})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    a = ap.parse_args()
    make_tiny_model(MODEL_DIR)
    servers = {"aggregated (no connector)": start_vllm("idle-agg"),
               "kvbridge producer": start_vllm("idle-kvb-producer", "prefill", {}),
               "kvbridge consumer": start_vllm("idle-kvb-consumer", "decode", {"load_timeout_s": 60.0}),
               "NixlConnector (kv_both)": start_vllm("idle-nixl",
                                                     vllm_args=("--kv-transfer-config", json.dumps(NIXL)),
                                                     env={"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())})}
    try:
        for s in servers.values():
            s.wait_ready()
        time.sleep(3)
        idle = busy(servers, a.seconds)
        consumer = servers["kvbridge consumer"]
        body = decode_body({"model": "tiny", "prompt": random_token_prompt(300, 1), "max_tokens": 2},
                           uuid.uuid4().hex)
        waiting = threading.Thread(target=lambda: requests.post(consumer.url + "/v1/completions", json=body,
                                                                timeout=120), daemon=True)
        waiting.start()
        time.sleep(1)
        waiting_cpu = busy({"c": consumer}, min(a.seconds, 30.0))["c"]  # load_timeout_s is 60
    finally:
        for s in servers.values():
            s.stop()
    print(f"CPU-seconds per second over {a.seconds:.0f} s (1.0 = one core busy), by process:")
    for k, v in idle.items():
        show(f"{k}, idle", v)
    show("kvbridge consumer, waiting for KV that never comes", waiting_cpu)


if __name__ == "__main__":
    main()

"""PD across hosts: prefill, decode and router in three network namespaces joined by links shaped to
--rate (and --delay where the kernel has netem), on the bench model (32 KiB of KV per token).

Prints, from one run: the raw TCP throughput of the prefill->decode link (Python sockets, median of
repeats), kvbridge's transfer engine alone over the same link (bench/hosts_transfer.py: 32 and 256 MiB, ALLOC to
the last chunk landed, against raw TCP), TTFT of the prefill host computing a request itself (aggregated) against PD through the router
(median of repeats; every PD answer checked equal to aggregated), and kvbridge's push rate (bytes the
producer pushed / its SENDING->SENT time) as a share of the raw TCP figure. Pushing overlaps the
prefill's compute, and SENDING->SENT includes the wait for chunks not yet computed: the rate is a lower
bound on what the link carried while KV was on it.

    python bench/hosts_bench.py [--lengths 1000 2000] [--repeats 5] [--rate 10gbit] [--delay 50us]
        [--ucx-error-handling peer|none]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import secrets
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests
import yaml

from bench.hosts_transfer import transfer_gbps
from launch import netns
from launch.local_servers import LOG_DIR, MODEL_DIR
from launch.netns import LinkShape, NetnsError, entered
from launch.placement import ROUTER, Placement
from launch.role_config import load_config
from launch.tiny_model import make_tiny_model
from transfer.ucx_error_handling import ERROR_HANDLING, UcxErrorHandling

MODEL = MODEL_DIR.parent / "bench"
METRICS_PORT = 9300
_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
_ARGS = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "4096"]


def write_graph(folder: Path, ucx: UcxErrorHandling = "peer") -> Path:
    """The prefill host keeps no prefix cache: its own (aggregated) run of a prompt must not make the
    PD run of the same prompt free. Both nodes' UCX error handling is `ucx`."""
    files = {
        "prefill.yaml": {"role": "prefill", "name": "prefill-0", "model": str(MODEL), "served_model_name": "tiny",
                         "port": 8100, "vllm_args": [*_ARGS, "--no-enable-prefix-caching"],
                         "env": dict(_ENV, VLLM_CPU_OMP_THREADS_BIND="0"),
                         "connector": {"metrics_port": METRICS_PORT, "ucx_error_handling": ucx}},
        "decode.yaml": {"role": "decode", "name": "decode-0", "model": str(MODEL), "served_model_name": "tiny",
                        "port": 8200, "vllm_args": _ARGS, "env": dict(_ENV, VLLM_CPU_OMP_THREADS_BIND="1"),
                        "connector": {"listen_port": 5600, "ucx_error_handling": ucx}},
        "router.yaml": {"role": "router", "port": 8000, "model": "tiny",
                        "prefill": [{"name": "prefill-0", "url": "http://127.0.0.1:8100"}],
                        "decode": [{"name": "decode-0", "url": "http://127.0.0.1:8200",
                                    "kv_address": "127.0.0.1:5600"}]},
        "deployment.yaml": {"role": "deployment", "name": "bench-hosts", "prefill": ["prefill.yaml"],
                            "decode": ["decode.yaml"], "router": "router.yaml",
                            "hosts": {"hp": ["prefill-0"], "hd": ["decode-0"], "hr": [ROUTER]}},
    }
    for name, data in files.items():
        (folder / name).write_text(yaml.safe_dump(data))
    return folder / "deployment.yaml"


def raw_tcp_gbps(placed: Placement, src: str, dst: str, nbytes: int = 256 << 20) -> float:
    """One TCP stream of `nbytes` from host `src` to host `dst` over their link, in GB/s."""
    addr = placed.net.hosts[dst].address
    with entered(placed.net.hosts[dst].namespace):
        server = socket.create_server((addr, 0))
    port = server.getsockname()[1]
    got = [0]

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(1 << 20):
                got[0] += len(data)
    t = threading.Thread(target=sink)
    t.start()
    with entered(placed.net.hosts[src].namespace):
        client = socket.create_connection((addr, port))
    buf = bytes(1 << 20)
    t0 = time.perf_counter()
    with client:
        for _ in range(nbytes >> 20):
            client.sendall(buf)
    t.join()
    took = time.perf_counter() - t0
    server.close()
    assert got[0] == nbytes, f"sent {nbytes} bytes, {got[0]} arrived"
    return nbytes / took / 1e9


def stream_ttft(namespace: str, url: str, body: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    first, text = None, []
    with entered(namespace), requests.post(url + "/v1/completions", json=dict(body, stream=True), stream=True,
                                           timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                first = first if first is not None else time.perf_counter() - t0
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return first, "".join(text)


def pushed_bytes(placed: Placement) -> float:
    with entered(placed.namespace("prefill-0")):
        text = requests.get(f"http://{placed.address('prefill-0')}:{METRICS_PORT}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kvbridge_transfer_pushed_bytes_total"))


def sending_seconds(log_path: Path) -> float:
    """Sum over the producer's completed transfers of SENDING -> SENT (its state log, in ms)."""
    pat = re.compile(r"producer \S+ -> SENT \{.*'SENDING': ([\d.]+), 'SENT': ([\d.]+)\}")
    return sum(float(b) - float(a) for a, b in pat.findall(log_path.read_text(errors="replace"))) / 1000


def shaped(placed: Placement, rate: str, delay: str | None) -> str:
    """Shape the links both ways; what was applied (delay is left out where the kernel has no netem)."""
    note = f"rate {rate}" + (f", delay {delay}" if delay else "")
    try:
        for a, b in (("hp", "hd"), ("hd", "hp"), ("hr", "hp"), ("hp", "hr"), ("hr", "hd"), ("hd", "hr")):
            placed.net.shape(a, b, LinkShape(rate, delay))
    except NetnsError as e:
        if not delay:
            raise
        note = f"rate {rate}; delay NOT applied ({e})"
        for a, b in (("hp", "hd"), ("hd", "hp"), ("hr", "hp"), ("hp", "hr"), ("hr", "hd"), ("hd", "hr")):
            placed.net.shape(a, b, LinkShape(rate))
    return note


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--rate", default="10gbit")
    ap.add_argument("--delay", default="50us")
    ap.add_argument("--ucx-error-handling", choices=ERROR_HANDLING, default="peer",
                    help="both nodes' UCX error handling (transfer/ucx_error_handling.py)")
    args = ap.parse_args()
    why = netns.unavailable()
    if why:
        raise SystemExit(why)
    make_tiny_model(MODEL, "bench")
    rng = random.Random(0)
    dep = load_config(write_graph(Path(tempfile.mkdtemp(prefix="hosts-bench-")), args.ucx_error_handling))
    env = {"KVBRIDGE_SECRET": secrets.token_hex(16)}
    with Placement(dep, *dep.load()) as placed:
        link = shaped(placed, args.rate, args.delay)
        raw = statistics.median(raw_tcp_gbps(placed, "hp", "hd") for _ in range(3))
        print(f"links: {link}; raw TCP prefill->decode (one stream, median of 3): {raw:.2f} GB/s", flush=True)
        print(f"UCX error handling on both nodes: {args.ucx_error_handling}", flush=True)
        engine = {mib: transfer_gbps(placed.net, "hp", "hd", mib << 20, 3, args.ucx_error_handling)
                  for mib in (32, 256)}
        for mib, gbps in engine.items():
            print(f"kvbridge transfer engine prefill->decode, {mib} MiB (ALLOC to last chunk landed, median of 3): "
                  f"{gbps:.2f} GB/s = {gbps / raw:.2f} x raw TCP", flush=True)
        vllms = placed.vllm_servers(LOG_DIR, env)
        router = placed.router_server(LOG_DIR, env)
        try:
            for s in vllms:
                s.start()
            for s in vllms:
                s.wait_ready()
            router.start()
            router.wait_ready(60)
            prefill, ns_p, ns_r = vllms[0], placed.namespace("prefill-0"), placed.namespace(ROUTER)
            for _ in range(2):  # warm-up: first requests pay one-time costs on both paths
                b = {"model": "tiny", "prompt": [rng.randrange(10, 1000) for _ in range(64)], "max_tokens": 2}
                stream_ttft(ns_p, prefill.url, b), stream_ttft(ns_r, router.url, b)
            bytes0, send0 = pushed_bytes(placed), sending_seconds(prefill.log_path)
            rows = []
            for n in args.lengths:
                agg, pd, equal = [], [], 0
                for _ in range(args.repeats):
                    body = {"model": "tiny", "prompt": [rng.randrange(10, 1000) for _ in range(n)],
                            "max_tokens": args.max_tokens, "temperature": 0}
                    ta, want = stream_ttft(ns_p, prefill.url, body)
                    tp, got = stream_ttft(ns_r, router.url, body)
                    agg.append(ta)
                    pd.append(tp)
                    equal += got == want
                rows.append((n, statistics.median(agg) * 1000, statistics.median(pd) * 1000, equal))
                print(f"  {n} tokens: aggregated TTFT {rows[-1][1]:.1f} ms, PD {rows[-1][2]:.1f} ms", flush=True)
            moved = pushed_bytes(placed) - bytes0
            sending = sending_seconds(prefill.log_path) - send0
        finally:
            for s in [router, *vllms]:
                s.terminate()
            for s in [router, *vllms]:
                s.wait_stopped(20)
    print("\nprompt  aggregated TTFT ms  PD TTFT ms  PD overhead ms  ratio  answers equal")
    for n, a, p, eq in rows:
        print(f"{n:6} {a:19.1f} {p:11.1f} {p - a:15.1f} {p / a:6.2f}  {eq}/{args.repeats}")
    rate = moved / sending / 1e9 if sending else float("nan")
    for mib, gbps in engine.items():
        print(f"transfer engine alone, {mib} MiB: {gbps:.2f} GB/s, {gbps / raw:.2f} x raw TCP ({raw:.2f} GB/s)")
    print(f"\nkvbridge pushed {moved / 1e6:.1f} MB in {sending:.2f} s of SENDING->SENT (compute included): "
          f"{rate:.2f} GB/s, "
          f"{rate / raw:.2f} x raw TCP on the same link ({raw:.2f} GB/s)")
    print("(2-core machine shared with other engineers' runs: figures are this run's, loaded)")


if __name__ == "__main__":
    main()

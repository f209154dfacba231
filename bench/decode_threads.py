"""Who uses the CPU while a decode node decodes: every thread of both kvbridge nodes, by thread name, during the
decode of a PD-received request and of a prompt the same decode node computed itself (bench/decode_gaps.py's
`pd` and `decode-node-local`, same pause before the decode).

A connector that cost the decode loop something would show it here as CPU of its own threads (`kvb-*`, ZMQ's),
as more CPU in the engine's threads than the local decode uses, or as work on the prefill node while the decode
runs. Each thread's user + system time is read from /proc before and after each decode, divided by the decode's
wall time (1.0: one core kept busy), and averaged over prompts; the prompts alternate which system goes first.

    python -m bench.decode_threads [--length 2000] [--repeats 12] [--max-tokens 96] [--decode-after 1.5]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
import uuid
from collections import Counter

import requests

from bench.confine import confine, process_group_tasks
from bench.pd_bench import MODEL
from bench.streamed import gaps_by_index, in_range, stream_ttft
from launch.local_servers import start_vllm
from launch.servers import VllmServer
from launch.tiny_model import make_tiny_model
from router.leg_bodies import decode_body, prefill_body

TICKS = os.sysconf("SC_CLK_TCK")
SHOWN = 0.002  # threads under this many core-seconds per second in both systems are left out of the table


def thread_cpu(servers: dict[str, VllmServer]) -> Counter[tuple[str, str]]:
    """CPU seconds so far of every thread of each server's process group, summed by (server, thread name)."""
    out: Counter[tuple[str, str]] = Counter()
    for name, server in servers.items():
        for pid, tid in process_group_tasks(os.getpgid(server.proc.pid)):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    comm = f.read().strip()
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended while listed
                continue
            out[(name, comm)] += (int(fields[11]) + int(fields[12])) / TICKS
    return out


def prepared(system: str, p: VllmServer, d: VllmServer, body: dict, rng: random.Random) -> dict:
    """The decode request of `system`, its prompt's KV already on the decode node: pushed there (pd) or computed
    there (decode-node-local: a prompt of the same length, so that each system's prompt is new to the node)."""
    if system == "pd":
        tid = uuid.uuid4().hex
        requests.post(p.url + "/v1/completions", json=prefill_body(body, tid, d.handshake),
                      timeout=300).raise_for_status()
        return decode_body(body, tid)
    own = dict(body, prompt=[rng.randrange(10, 1000) for _ in body["prompt"]])
    requests.post(d.url + "/v1/completions", json=dict(own, max_tokens=1), timeout=300).raise_for_status()
    return own


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--decode-after", type=float, default=1.5, help="seconds of quiet before each decode")
    args = ap.parse_args()
    make_tiny_model(MODEL, "bench")
    rng, own = random.Random(1), random.Random(2)
    servers = {"prefill": start_vllm("bench-threads-prefill", "prefill", {}, model=MODEL, max_model_len=4096),
               "decode": start_vllm("bench-threads-decode", "decode", {}, model=MODEL, max_model_len=4096)}
    p, d = servers["prefill"], servers["decode"]
    systems = ["pd", "decode-node-local"]
    cpu = {s: Counter() for s in systems}
    per_token: dict[str, list[float]] = {s: [] for s in systems}
    try:
        for server in servers.values():
            server.wait_ready(900)
        print(f"confined to core 0: {confine(p, {0})} threads of the prefill node", flush=True)
        for turn in range(args.repeats + 1):  # the first turn warms both paths up and is not counted
            body = {"model": "tiny", "prompt": [rng.randrange(10, 1000) for _ in range(args.length)],
                    "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
            for system in systems if turn % 2 == 0 else systems[::-1]:
                request = prepared(system, p, d, body, own)
                time.sleep(args.decode_after)
                before, t0 = thread_cpu(servers), time.monotonic()
                got = stream_ttft(d.url, request)
                after, wall = thread_cpu(servers), time.monotonic() - t0
                if turn:
                    per_token[system].append(in_range(gaps_by_index(got), 1, 10_000) * 1000)
                    cpu[system].update({k: (after[k] - before.get(k, 0.0)) / wall / args.repeats for k in after})
            if turn:
                print(f"  prompt {turn}: ms per token " + ", ".join(f"{s} {per_token[s][-1]:.2f}" for s in systems),
                      flush=True)
    finally:
        for server in servers.values():
            server.stop()
    print(f"\n{args.length}-token prompts, {args.repeats} prompts: median ms per output token "
          + ", ".join(f"{s} {statistics.median(per_token[s]):.2f}" for s in systems))
    print("CPU during the decode, core-seconds per second, mean over prompts, by node and thread name:")
    print(f"  {'node':8} {'thread':18} {'pd':>8} {'local':>8} {'pd - local':>11}")
    rows = sorted(set(cpu["pd"]) | set(cpu["decode-node-local"]), key=lambda k: -cpu["pd"][k])
    for key in rows:
        a, b = cpu["pd"][key], cpu["decode-node-local"][key]
        if max(a, b) >= SHOWN:
            print(f"  {key[0]:8} {key[1]:18} {a:8.3f} {b:8.3f} {a - b:+11.3f}")


if __name__ == "__main__":
    main()

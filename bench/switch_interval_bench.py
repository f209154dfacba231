"""What the interpreter's switch interval (`gil_switch_interval_ms`) buys and costs on each role, without vLLM.

kvbridge's threads (the producer's push thread, the consumer endpoint's thread) share their process's interpreter
with the engine thread, which holds it between torch calls. A thread that wants the interpreter gets it only when
the holder blocks or after the switch interval (Python's default: 5 ms). Here both engines hold it all the time —
pure-Python loops, the worst case for kvbridge's threads:
  prefill: stages a prompt's chunks as the forward that computed them ends, the last one after a `--forward-ms`
           forward, then keeps computing (the next requests) while the chunks are pushed;
  decode:  runs `--step-ms` decode steps and looks for the transfer between steps, as the worker does.
Per setting (prefill interval, decode interval) it prints, medians of `--repeats`:
  ready -> seen:   the last chunk staged until the decode's engine saw the transfer complete (what the
                   interval delays: the push thread's posts, the consumer thread's notification pump);
  prefill engine:  its loop's speed while the push runs, against the same loop alone (what the push costs it);
  decode step:     a decode step's time while the transfer lands, against a step with nothing arriving.

    python -m bench.switch_interval_bench [--settings 0.5,0.5 5,0.5 0.5,5 5,5] [--repeats 15]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
import uuid

import torch

from bench.exposed_bench import CHUNK_TOKENS, LAYOUT, TOKEN_HASH, _filler
from transfer.consumer_endpoint import ConsumerEndpoint
from transfer.consumer_settings import ConsumerSettings
from transfer.device_fence import COMPLETED
from transfer.identity import TransferSpec
from transfer.producer import Producer, ProducerSettings
from transfer.receive_book import Arrival


def hold(seconds: float) -> int:
    """Compute in Python for `seconds`, holding the interpreter as an engine between torch calls; loop turns."""
    end, turns = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        for _ in range(100):
            pass
        turns += 1
    return turns


def _decode(conn, switch_s: float, step_s: float) -> None:
    sys.setswitchinterval(switch_s)
    ep = ConsumerEndpoint(LAYOUT, ConsumerSettings(chunk_tokens=CHUNK_TOKENS, num_slots=64))
    conn.send(ep.address)

    def step() -> float:
        t0 = time.perf_counter()
        hold(step_s)
        return time.perf_counter() - t0
    alone = statistics.median(step() for _ in range(50))
    while (msg := conn.recv()) is not None:
        key, num_tokens = msg
        ep.book.expect(key, num_tokens, TOKEN_HASH)
        conn.send("expecting")
        steps = []
        while ep.book.status(key)[0] not in (Arrival.COMPLETE, Arrival.ENDED):
            steps.append(step())
        seen = time.time()
        lease, why = ep.book.claim(key)
        ready = max(n.kv_ready_at for n in lease.arrived.values()) if lease else float("nan")
        ep.book.finish(key, lease, {"transfer_id": key, "state": "SCATTERED"}, COMPLETED)
        conn.send((seen - ready, statistics.median(steps) / alone if steps else float("nan"), why))
    ep.close()


def measure(prefill_s: float, decode_s: float, args) -> tuple[float, float, float]:
    """(ready -> seen ms, prefill engine speed while pushing / alone, decode step while receiving / alone)."""
    sys.setswitchinterval(prefill_s)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_decode, args=(child, decode_s, args.step_ms / 1000), daemon=True)
    proc.start()
    address = conn.recv()
    producer = Producer(LAYOUT, CHUNK_TOKENS, ProducerSettings(producer_id=f"switch-bench-{uuid.uuid4().hex[:8]}"))
    nbytes, slice_s = LAYOUT.chunk_bytes(CHUNK_TOKENS), 0.002
    alone = hold(1.0)  # loop turns per second with no push running
    seen_ms, speed, step = [], [], []
    try:
        for i in range(args.repeats + 1):  # the first request opens the link: not counted
            key = f"s-{uuid.uuid4().hex}"
            spec = TransferSpec(key, (args.chunks + 1) * CHUNK_TOKENS, TOKEN_HASH, 0)
            conn.send((key, spec.num_tokens))
            conn.recv()
            handle = producer.begin(spec, address)
            for c in range(args.chunks + 1):
                if c == args.chunks:
                    hold(args.forward_ms / 1000)
                assert producer.stage(handle, c, _filler(c, nbytes)), f"chunk {c} not staged"
            t0, turns = time.perf_counter(), 0
            while not conn.poll():  # the engine goes on computing while the push runs
                turns += hold(slice_s)
            rate = turns / (time.perf_counter() - t0)
            exposed, ratio, why = conn.recv()
            assert not why, why
            if i:
                seen_ms.append(exposed * 1000)
                speed.append(rate / alone)
                step.append(ratio)
    finally:
        producer.close()
        conn.send(None)
        proc.join(10)
    return statistics.median(seen_ms), statistics.median(speed), statistics.median(step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=["0.5,0.5", "5,0.5", "0.5,5", "5,5"],
                    help="prefill_ms,decode_ms switch intervals")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--chunks", type=int, default=3, help="chunks staged before the last forward")
    ap.add_argument("--forward-ms", type=float, default=50.0)
    ap.add_argument("--step-ms", type=float, default=10.0, help="a decode step's compute")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{args.chunks + 1} chunks of {LAYOUT.chunk_bytes(CHUNK_TOKENS) >> 20} MiB, last forward {args.forward_ms} ms, "
          f"decode steps of {args.step_ms} ms; medians of {args.repeats}")
    print("switch interval ms   ready->seen ms   prefill engine speed   decode step")
    print("prefill  decode      (lower better)   while pushing/alone    while receiving/alone")
    for setting in args.settings:
        p_ms, d_ms = (float(x) for x in setting.split(","))
        seen, speed, step = measure(p_ms / 1000, d_ms / 1000, args)
        print(f"{p_ms:7.1f} {d_ms:7.1f} {seen:16.2f} {speed:22.3f} {step:22.3f}", flush=True)


if __name__ == "__main__":
    main()

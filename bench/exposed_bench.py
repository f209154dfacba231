"""The transfer's share of the exposed time, without vLLM: real Producer and ConsumerEndpoint, two processes.

Per request the producer stages every chunk as the prefill's last forward would (the last one stamps
`kv_ready_at`); the consumer process waits as the decode worker does when idle (`wait_arrivals`, woken by
the notification pump) and claims the complete lease. It reports, medians of repeats:
  stage -> complete: last chunk staged until the decode's wait loop sees the transfer complete (the part of
                     kvbridge_exposed_transfer_seconds that is transfer, not scatter or vLLM scheduling);
  stage -> posted:   until the push thread took the last chunk to write it (its wake-up, the gather's fence,
                     and the writes queued before it);
and the same with the consumer's busy poll interval changed (`--busy-poll-ms`). Chunks leave as they are
staged, so only what is staged by the last forward is exposed: `--forward-ms 0` stages every chunk at once
(a prompt computed in one forward: all its KV is exposed), `--forward-ms N` stages the last chunk N ms after
the `--chunks` before it (a chunked prefill: the earlier chunks left meanwhile).

    python -m bench.exposed_bench [--repeats 30] [--chunks 3] [--forward-ms 0 50] [--busy-poll-ms 0.5 0.1]
                                  [--ucx-error-handling peer none]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
import uuid

import torch

from transfer.consumer_endpoint import ConsumerEndpoint

from transfer.consumer_settings import ConsumerSettings
from transfer.device_fence import COMPLETED
from transfer.identity import TransferSpec
from transfer.layout import KVLayout
from transfer.producer import Producer, ProducerSettings
from transfer.receive_book import Arrival
from transfer.ucx_error_handling import ERROR_HANDLING, UcxErrorHandling

# The bench model's cache (launch/tiny_model.py, bench size): 8 layers, 4 KV heads of 128, float32 (32 KiB a token).
LAYOUT = KVLayout(model_id="bench", num_layers=8, num_kv_heads=4, kv_heads_per_rank=4, head_size=128,
                  dtype="float32", block_size=16, cache_layout="LBHNC")
CHUNK_TOKENS = 256
TOKEN_HASH = "ab" * 16


def _decode(conn, busy_poll_s: float, error_handling: UcxErrorHandling) -> None:
    """The decode worker's side: expect, wait as an idle engine step does, claim, report when it was complete."""
    ep = ConsumerEndpoint(LAYOUT, ConsumerSettings(chunk_tokens=CHUNK_TOKENS, num_slots=64, busy_poll_s=busy_poll_s,
                                                   ucx_error_handling=error_handling))
    conn.send(ep.address)
    while (msg := conn.recv()) is not None:
        key, num_tokens = msg
        ep.book.expect(key, num_tokens, TOKEN_HASH)
        conn.send("expecting")
        while ep.book.status(key)[0] not in (Arrival.COMPLETE, Arrival.ENDED):
            ep.wait_arrivals(0.02)
        seen = time.time()
        lease, why = ep.book.claim(key)
        ready = max(n.kv_ready_at for n in lease.arrived.values()) if lease else float("nan")
        ep.book.finish(key, lease, {"transfer_id": key, "state": "SCATTERED"}, COMPLETED)
        conn.send((seen - ready, why))
    ep.close()


def _filler(value: int, nbytes: int):
    def fill(view) -> int:
        view[:nbytes].fill_(value % 251)
        return nbytes
    return fill


def measure(busy_poll_s: float, repeats: int, chunks: int, forward_s: float,
            error_handling: UcxErrorHandling = "peer") -> dict[str, float]:
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_decode, args=(child, busy_poll_s, error_handling), daemon=True)
    proc.start()
    address = conn.recv()
    producer = Producer(LAYOUT, CHUNK_TOKENS, ProducerSettings(producer_id=f"exposed-bench-{uuid.uuid4().hex[:8]}",
                                                               ucx_error_handling=error_handling))
    nbytes = LAYOUT.chunk_bytes(CHUNK_TOKENS)
    complete, posted = [], []
    try:
        for i in range(repeats + 1):  # the first request opens the link: not counted
            key = f"x-{uuid.uuid4().hex}"
            spec = TransferSpec(key, (chunks + 1) * CHUNK_TOKENS, TOKEN_HASH, 0)
            conn.send((key, spec.num_tokens))
            conn.recv()
            handle = producer.begin(spec, address)
            for c in range(chunks + 1):
                if c == chunks:
                    time.sleep(forward_s)  # the last forward computes; earlier chunks are on their way
                    t_last = time.time()
                assert producer.stage(handle, c, _filler(c, nbytes)), f"chunk {c} not staged"
            # the push thread posted the last chunk's write, notice and all (its state: no public call says so)
            while (job := producer._jobs.get(handle)) is not None and any(
                    not sc.announced for sc in list(job.staged.values())):
                time.sleep(0.00005)
            t_posted = time.time()
            exposed, why = conn.recv()
            assert not why, why
            if i:
                complete.append(exposed * 1000)
                posted.append((t_posted - t_last) * 1000)
    finally:
        producer.close()
        conn.send(None)
        proc.join(10)
    return {"stage_to_complete_ms": statistics.median(complete), "stage_to_posted_ms": statistics.median(posted)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--chunks", type=int, default=3, help="chunks before the last one")
    ap.add_argument("--forward-ms", type=float, nargs="+", default=[0.0, 50.0])
    ap.add_argument("--busy-poll-ms", type=float, nargs="+", default=[0.5, 0.1])
    ap.add_argument("--ucx-error-handling", nargs="+", default=["peer"], choices=list(ERROR_HANDLING),
                    help="UCX error handling of both sides, each in turn (transfer/ucx_error_handling.py)")
    args = ap.parse_args()
    # The prefill engine gathers with the one OpenMP thread bound to its core; torch's default (all cores) here
    # made each 8 MiB fill wait 15-35 ms for a descheduled OpenMP thread on a loaded 2-core box.
    torch.set_num_threads(1)
    print(f"{args.chunks + 1} chunks of {LAYOUT.chunk_bytes(CHUNK_TOKENS) >> 20} MiB; medians of {args.repeats}")
    print(f"{'last forward ms':>15} {'UCX errors':>10} {'consumer busy poll':>18} {'stage->posted ms':>17} "
          f"{'stage->complete ms':>19}")
    for fwd in args.forward_ms:
        for mode in args.ucx_error_handling:
            for ms in args.busy_poll_ms:
                r = measure(ms / 1000, args.repeats, args.chunks, fwd / 1000, mode)
                print(f"{fwd:15.0f} {mode:>10} {ms:15.2f} ms {r['stage_to_posted_ms']:17.3f} "
                      f"{r['stage_to_complete_ms']:19.3f}", flush=True)


if __name__ == "__main__":
    main()

"""PD on one GPU: a 4096-token prefill of a Llama-3-8B-shaped cache (32 layers, 8 KV heads, head 128, bf16,
block 16) gathered, pushed and scattered through the real `Producer` and consumer endpoint, in two processes.

The producer's KV is written by a kernel queued behind ~0.2 s of matmuls on the forward's stream, and every
chunk is staged at once, as vLLM's `wait_for_save` does while the forward still runs: only the fences keep
the push from leaving before the KV exists. The bytes that land in the consumer's blocks must equal the
producer's. Time runs from the moment the KV exists to the moment the last scatter completed; it is shown
as GB/s next to a device-to-device copy of the same bytes in the same run (the goal: 0.8 x D2D / 3, since
gather, write and scatter each cross HBM once). Medians of --repeats.

    python -m bench.gpu_pd [--device cuda] [--layout LBNHC] [--repeats 5] [--ucx-error-handling peer|none]
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import statistics
import time

import torch

from bench.llama_cache import BLOCK, LAYERS, llama_layout, llama_views
from pd.paged_kv import PagedKV
from transfer.consumer_endpoint import ConsumerEndpoint
from transfer.consumer_settings import ConsumerSettings
from transfer.device_fence import recorder_for
from transfer.identity import TransferSpec
from transfer.producer import Producer, ProducerSettings
from transfer.receive_book import Arrival
from transfer.ucx_error_handling import ERROR_HANDLING, UcxErrorHandling

TOKENS, CHUNK_TOKENS = 4096, 256


def _digest(kv: PagedKV, ids: list[int]) -> str:
    out = torch.empty(kv.chunk_nbytes(len(ids)), dtype=torch.uint8, device=kv.device)
    kv.gather(ids, out)
    return hashlib.blake2b(out.cpu().numpy().tobytes(), digest_size=16).hexdigest()


def _consumer(conn, device: str, layout_name: str, layers: int, n_blocks: int, ucx: UcxErrorHandling) -> None:
    layout = llama_layout(layout_name, layers)
    kv = PagedKV(llama_views(layout_name, n_blocks, device, layers), layout)
    n_chunks = TOKENS // CHUNK_TOKENS
    ep = ConsumerEndpoint(layout, ConsumerSettings(chunk_tokens=CHUNK_TOKENS, num_slots=2 * n_chunks, device=device,
                                                   ucx_error_handling=ucx))
    conn.send(ep.address)
    fence = recorder_for(device)
    bpc = CHUNK_TOKENS // BLOCK
    while (job := conn.recv()) != "stop":
        key, ids = job
        ep.book.expect(key, TOKENS, "bench", 1)
        while ep.book.status(key)[0] != Arrival.COMPLETE:
            if ep.book.status(key)[0] == Arrival.ENDED:
                raise RuntimeError(ep.book.status(key)[1])
            ep.wait_arrivals(0.001)
        lease, why = ep.book.claim(key)
        for c, view in enumerate(ep.chunk_views(lease)):
            kv.scatter(ids[c * bpc:(c + 1) * bpc], view)
        done = fence()
        ep.book.finish(key, lease, {"state": "SCATTERED"}, done)
        while not done.done():
            pass
        conn.send((time.perf_counter(), _digest(kv, ids)))
    ep.close()


def _forward_then_kv(views: list[torch.Tensor], seed: int, device: str) -> None:
    """~0.2 s of matmuls, then the kernel that writes the KV, all queued on the current stream."""
    gpu = device.startswith("cuda")
    a = torch.randn(8192 if gpu else 256, 8192 if gpu else 256, device=device, dtype=torch.bfloat16)
    for _ in range(160 if gpu else 1):  # 160 x 1.1 TFLOP: ~0.2 s on an H100
        a = (a @ a).clamp_(-1, 1)
    g = torch.Generator(device=device).manual_seed(seed)
    for v in views:
        v.copy_(torch.randn(v.shape, generator=g, device=device, dtype=torch.float32).to(v.dtype) + a[0, 0])


def run(device: str, layout_name: str, repeats: int, layers: int = LAYERS, ucx: UcxErrorHandling = "peer") -> dict:
    n_blocks = 2 * TOKENS // BLOCK
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_consumer, args=(child, device, layout_name, layers, n_blocks, ucx), daemon=True)
    proc.start()
    address = conn.recv()
    layout = llama_layout(layout_name, layers)
    views = llama_views(layout_name, n_blocks, device, layers)
    kv = PagedKV(views, layout)
    p = Producer(layout, CHUNK_TOKENS, ProducerSettings(producer_id="bench", staging_chunks=TOKENS // CHUNK_TOKENS,
                                                        device=device, ucx_error_handling=ucx))
    nbytes = kv.chunk_nbytes(TOKENS // BLOCK)
    src, dst = (torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2))
    times, d2d = [], []
    for r in range(repeats):
        perm = torch.randperm(n_blocks).tolist()
        src_ids, dst_ids = perm[:TOKENS // BLOCK], perm[TOKENS // BLOCK:]
        key = f"bench-{r}"
        conn.send((key, dst_ids))
        handle = p.begin(TransferSpec(key, TOKENS, "bench", 0), address)
        _forward_then_kv(views, r, device)
        ready = recorder_for(device)()
        bpc = CHUNK_TOKENS // BLOCK
        for c in range(TOKENS // CHUNK_TOKENS):
            assert p.stage(handle, c, lambda out, c=c: kv.gather(src_ids[c * bpc:(c + 1) * bpc], out))
        while not ready.done():  # the bench's clock, not the engine's: every chunk is already staged
            pass
        t_ready = time.perf_counter()
        t_done, got = conn.recv()
        if got != _digest(kv, src_ids):
            raise SystemExit(f"repeat {r}: the bytes that landed differ from the producer's KV")
        times.append(t_done - t_ready)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        d2d.append(time.perf_counter() - t0)
    conn.send("stop")
    proc.join(20)
    p.close()
    t, c = statistics.median(times), statistics.median(d2d)
    return {"bytes": nbytes, "pd_gb_s": nbytes / t / 1e9, "d2d_gb_s": nbytes / c / 1e9,
            "ratio_to_d2d_over_3": (nbytes / t) / (nbytes / c / 3), "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layout", default="LBNHC")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=LAYERS, help="fewer layers for a quick run on CPU")
    ap.add_argument("--ucx-error-handling", choices=ERROR_HANDLING, default="peer",
                    help="both agents' UCX error handling (transfer/ucx_error_handling.py)")
    a = ap.parse_args()
    r = run(a.device, a.layout, a.repeats, a.layers, a.ucx_error_handling)
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(f"{r['bytes'] / 2**20:.0f} MiB of KV ({TOKENS} tokens, layout {a.layout}) on {name}, UCX error "
          f"handling {a.ucx_error_handling}, "
          f"medians of {r['repeats']}: PD {r['pd_gb_s']:.1f} GB/s, D2D copy {r['d2d_gb_s']:.1f} GB/s, "
          f"PD / (D2D/3) = {r['ratio_to_d2d_over_3']:.2f} (goal >= 0.8); every repeat's bytes landed equal")


if __name__ == "__main__":
    main()

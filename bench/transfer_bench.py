"""Transfer benchmark: producer and consumer as two processes on 127.0.0.1, real NIXL.

For each size it times one contiguous WRITE (post -> DONE, median of repeats) and a
single-process memcpy of the same bytes in the same run, and prints the ratio. On the host it also times the
kernel copy UCX's `cma` transport is built on (one `process_vm_writev` of the same bytes into the consumer's
registered buffer, in one call): what crossing from one process to another costs here, which an in-process
memcpy does not pay, as `ratio_cma` (UCX, splitting a write in pieces, can beat the one call). Every buffer is
what the engine registers (`zeroed_buffer`: huge pages on the host), the memcpy's included. Each
write carries a chunk notice, as the producer's do. Once a notice has gone over TCP (UCX's lane
for NIXL notifications with peer error handling) the next write completes only after the receiver
has made progress, so while writes are timed the consumer polls NIXL every `stream_poll_s`, as the
consumer endpoint does while chunks are on their way; while memcpy is timed it sleeps. Two
extra rows show why kvbridge gathers: a paged-KV workload (csrc gathers blocks into staging,
then one write per chunk, all chunks in flight; each half also timed alone) and the same bytes
as 64 KiB descriptors.

    python -m bench.transfer_bench [--device cuda] [--repeats 7] [--json] [--max-mib 256] [--desc-mib 16]

With --json, stdout carries the JSON alone: everything else written to it (NIXL's and UCX's own log
lines, from Python or native code, in either process) goes to stderr.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import statistics
import time

import torch

from pd.block_copy import block_copy_for
from transfer.consumer_settings import ConsumerSettings
from transfer.nixl_agent import NixlAgent, zeroed_buffer
from transfer.notice import ChunkNotice

MiB = 1 << 20


def _consumer(conn, nbytes: int, device: str) -> None:
    """Registers the destination and drives UCX progress as the consumer endpoint does while told
    'receiving' (chunks on their way): every stream_poll_s (it never spins: it shares the decode engine's
    core); in 1 ms sleeps while told 'idle'."""
    agent = NixlAgent("bench-consumer")
    region = agent.register(zeroed_buffer(nbytes, device))
    conn.send((agent.metadata(), region.addr, region.mem_type, region.dev_id))
    receiving = False
    while True:
        if conn.poll(0 if receiving else 0.001):
            msg = conn.recv()
            if msg == "done":
                break
            receiving = msg == "receiving"
        agent.notifications()
        if receiving:
            time.sleep(ConsumerSettings.stream_poll_s)
    agent.deregister(region)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_s(fn, repeats: int, device: str) -> float:
    fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _cma_s(pid: int, src_addr: int, dst_addr: int, size: int, repeats: int) -> float:
    """One process_vm_writev of `size` bytes into process `pid` (the kernel copy UCX's cma transport makes, in
    the writer's thread), median seconds."""
    libc = ctypes.CDLL(None, use_errno=True)
    local, remote = _IoVec(src_addr, size), _IoVec(dst_addr, size)

    def write() -> None:
        if libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) != size:
            raise OSError(ctypes.get_errno(), "process_vm_writev into the consumer failed")
    return _median_s(write, repeats, "cpu")


def _notice(chunk: int, nbytes: int) -> bytes:
    return ChunkNotice(transfer_id="bench-router-id:0123456789abcdef", chunk=chunk, epoch=1,
                       incarnation="0123456789abcdef0123456789abcdef", nbytes=nbytes, kv_ready_at=time.time()).encode()


class _Writer:
    def __init__(self, agent: NixlAgent, local, remote: str, raddr: int, rmem: str, rdev: int) -> None:
        self.agent, self.local, self.remote, self.raddr, self.rmem, self.rdev = agent, local, remote, raddr, rmem, rdev

    def write(self, spans: list[list[tuple[int, int, int]]]) -> None:
        """Post every span list as one request, all in flight at once, each with the notice a producer
        sends after a chunk (it changes when a write completes: see the module docstring); wait for all."""
        handles = [self.agent.write(self.local, [(lo, self.raddr + ro, n) for lo, ro, n in s], self.remote,
                                    self.rmem, self.rdev, _notice(i, sum(n for *_, n in s)))
                   for i, s in enumerate(spans)]
        pending = list(handles)
        while pending:
            pending = [h for h in pending if self.agent.poll(h) == "PROC"]
        for h in handles:
            self.agent.release(h)


def _paged_workload(device: str):
    """A realistic KV cache: 8 layers x 8 KV heads x head 128, bf16 (32 KiB/token), 128-token blocks."""
    layers, heads, head, bs, tokens, chunk_tokens = 8, 8, 128, 128, 2048, 256
    nblocks = 64
    caches = [torch.randn(nblocks, heads, bs, 2 * head, device=device).to(torch.bfloat16) for _ in range(layers)]
    blocks = torch.randperm(nblocks, device=device)[: tokens // bs]
    return caches, blocks, chunk_tokens // bs


def run(device: str, repeats: int, max_mib: int = 256, desc_mib: int = 16) -> list[dict]:
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    sizes = [s * MiB for s in (1, 16, 64, 256, 512, 1024) if s <= max_mib]
    total = max(sizes + [desc_mib * MiB, 64 * MiB])  # 64 MiB: the paged workload below
    proc = ctx.Process(target=_consumer, args=(child, total, device), daemon=True)
    proc.start()
    meta, raddr, rmem, rdev = conn.recv()
    agent = NixlAgent("bench-producer")
    src = zeroed_buffer(total, device).random_(0, 256)
    local = agent.register(src)
    w = _Writer(agent, local, agent.add_remote(meta), raddr, rmem, rdev)
    dst = zeroed_buffer(total, device)
    rows = []

    def nixl_s(fn) -> float:
        conn.send("receiving")
        try:
            return _median_s(fn, repeats, device)
        finally:
            conn.send("idle")
    for size in sizes:
        t_nixl = nixl_s(lambda: w.write([[(0, 0, size)]]))
        t_copy = _median_s(lambda: dst[:size].copy_(src[:size]), repeats, device)
        rows.append(_row(f"contiguous {size // MiB} MiB", size, t_nixl, t_copy,
                         _copy_1t(dst, src, size, repeats, device)))
        if device == "cpu":
            cma_gbs = size / _cma_s(proc.pid, local.addr, raddr, size, repeats) / 1e9
            rows[-1].update(cma_gb_s=round(cma_gbs, 2), ratio_cma=round(rows[-1]["gb_s"] / cma_gbs, 3))
    size, piece = desc_mib * MiB, 64 * 1024
    t_desc = nixl_s(lambda: w.write([[(o, o, piece) for o in range(0, size, piece)]]))
    t_copy = _median_s(lambda: dst[:size].copy_(src[:size]), repeats, device)
    rows.append(_row(f"{desc_mib} MiB as {size // piece} x 64 KiB descriptors", size, t_desc, t_copy,
                     _copy_1t(dst, src, size, repeats, device)))

    caches, blocks, per_chunk = _paged_workload(device)
    slab = caches[0][0].numel() * caches[0].element_size()
    nbytes = slab * len(blocks) * len(caches)
    staging = src[:nbytes]
    chunk_bytes = nbytes // (len(blocks) // per_chunk)
    chunks = [blocks[c0:c0 + per_chunk].tolist() for c0 in range(0, len(blocks), per_chunk)]
    copier = block_copy_for(caches, torch.device(device))

    def gather() -> list[list[tuple[int, int, int]]]:
        spans = []
        for i, ids in enumerate(chunks):
            start = i * chunk_bytes
            copier.gather(ids, staging[start:start + chunk_bytes])
            spans.append([(start, start, chunk_bytes)])
        _sync(device)
        return spans
    spans = gather()
    for name, fn, writes in ((f"paged KV {nbytes // MiB} MiB: csrc gather only", gather, False),
                             (f"paged KV {nbytes // MiB} MiB: {len(spans)} chunk writes only",
                              lambda: w.write(spans), True),
                             (f"paged KV {nbytes // MiB} MiB: gather + {len(spans)} chunk writes",
                              lambda: w.write(gather()), True)):
        t = nixl_s(fn) if writes else _median_s(fn, repeats, device)
        t_copy = _median_s(lambda: dst[:nbytes].copy_(src[:nbytes]), repeats, device)
        rows.append(_row(name, nbytes, t, t_copy, _copy_1t(dst, src, nbytes, repeats, device)))
    conn.send("done")
    proc.join(10)
    return rows


def _copy_1t(dst: torch.Tensor, src: torch.Tensor, n: int, repeats: int, device: str) -> float:
    """One-thread memcpy: UCX copies with one thread, torch's copy_ with every core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _median_s(lambda: dst[:n].copy_(src[:n]), repeats, device)
    finally:
        torch.set_num_threads(threads)


def _row(name: str, nbytes: int, t: float, t_copy: float, t_copy_1t: float) -> dict:
    gbs, copy_gbs, copy1 = nbytes / t / 1e9, nbytes / t_copy / 1e9, nbytes / t_copy_1t / 1e9
    return {"case": name, "bytes": nbytes, "gb_s": round(gbs, 2), "memcpy_gb_s": round(copy_gbs, 2),
            "ratio": round(gbs / copy_gbs, 3), "memcpy_1thread_gb_s": round(copy1, 2),
            "ratio_1thread": round(gbs / copy1, 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--max-mib", type=int, default=256, help="largest contiguous write (1, 16, 256, 512, 1024)")
    ap.add_argument("--desc-mib", type=int, default=16, help="bytes moved as 64 KiB descriptors")
    args = ap.parse_args(argv)
    if args.json:
        result = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)  # before any agent exists: native logs, and the consumer process, inherit stderr as fd 1
        rows = run(args.device, args.repeats, args.max_mib, args.desc_mib)
        result.write(json.dumps(rows, indent=1) + "\n")
        result.close()
        return
    rows = run(args.device, args.repeats, args.max_mib, args.desc_mib)
    print(f"{'case':58} {'GB/s':>7} {'memcpy':>7} {'ratio':>6} {'memcpy1t':>8} {'ratio1t':>7} {'cma':>6} "
          f"{'ratio_cma':>9}")
    for r in rows:
        cma = f"{r['cma_gb_s']:6.2f} {r['ratio_cma']:9.2f}" if "cma_gb_s" in r else ""
        print(f"{r['case']:58} {r['gb_s']:7.2f} {r['memcpy_gb_s']:7.2f} {r['ratio']:6.2f} "
              f"{r['memcpy_1thread_gb_s']:8.2f} {r['ratio_1thread']:7.2f} {cma}")


if __name__ == "__main__":
    main()

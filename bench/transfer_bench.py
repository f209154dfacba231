"""Transfer benchmark: producer and consumer as two processes on 127.0.0.1, real NIXL.

For each size it times one contiguous WRITE (post -> DONE) beside a single-process memcpy of the same bytes
(every thread, and one thread as UCX copies) and, on the host, the kernel copy UCX's `cma` transport is built on
(one `process_vm_writev` of the same bytes into the consumer's registered buffer, in one call): what crossing
from one process to another costs here, which an in-process memcpy does not pay (UCX, splitting a write in
pieces, can beat the one call). The timings are paired: each repeat times every one of them once, back to back,
in an order that rotates between repeats, and a ratio is the median of the repeats' own ratios with its 95 %
interval. Memory bandwidth on this shared machine moves by 2-4x between seconds; timed in separate blocks, as
before, a ratio said more about the box than about the transfer. Every buffer is what the engine registers
(`zeroed_buffer`: huge pages on the host), the memcpy's included. Each write carries a chunk notice, as the
producer's do. Once a notice has gone over TCP (UCX's lane for NIXL notifications with peer error handling) the
next write completes only after the receiver has made progress, so around each timed write the consumer polls
NIXL every `stream_poll_s`, as the consumer endpoint does while chunks are on their way; around the copies it
sleeps. With `--ucx-error-handling none` notifications go through shared memory and a write completes with its
copy (transfer/ucx_error_handling.py says what each mode gives up). Two extra rows show why kvbridge gathers: a
paged-KV workload (csrc gathers blocks into staging, then one write per chunk, all chunks in flight; each half also
timed alone) and the same bytes as 64 KiB descriptors.

    python -m bench.transfer_bench [--device cuda] [--repeats 7] [--json] [--max-mib 256] [--desc-mib 16]
                                   [--ucx-error-handling peer none]

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
from typing import Callable, NamedTuple

import torch

from bench.median_ci import median_ci

from pd.block_copy import block_copy_for
from transfer.consumer_settings import ConsumerSettings
from transfer.nixl_agent import NixlAgent, zeroed_buffer
from transfer.notice import ChunkNotice
from transfer.ucx_error_handling import ERROR_HANDLING, UcxErrorHandling

MiB = 1 << 20


def _consumer(conn, nbytes: int, device: str, error_handling: UcxErrorHandling) -> None:
    """Registers the destination and drives UCX progress as the consumer endpoint does while told
    'receiving' (chunks on their way): every stream_poll_s (it never spins: it shares the decode engine's
    core); in 1 ms sleeps while told 'idle'. Each change of mode is acknowledged, so that no timed write
    waits for the consumer to notice it."""
    agent = NixlAgent("bench-consumer", error_handling)
    region = agent.register(zeroed_buffer(nbytes, device))
    conn.send((agent.metadata(), region.addr, region.mem_type, region.dev_id))
    receiving = False
    while True:
        if conn.poll(0 if receiving else 0.001):
            msg = conn.recv()
            if msg == "done":
                break
            receiving = msg == "receiving"
            conn.send("ok")
        agent.notifications()
        if receiving:
            time.sleep(ConsumerSettings.stream_poll_s)
    agent.deregister(region)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _Op(NamedTuple):
    """One timed operation; `enter` and `leave` run around it, outside the time."""
    fn: Callable[[], None]
    enter: Callable[[], None] = lambda: None
    leave: Callable[[], None] = lambda: None


def _paired(ops: dict[str, _Op], repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per repeat of every op: each op once (untimed) to warm up, then each repeat times every op once,
    back to back, starting one op further on each time, so that whatever else the machine runs in that
    moment weighs on all of them and no op always follows the same one."""
    names = list(ops)
    out: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(-1, repeats):
        for i in range(len(names)):
            name = names[(rep + i) % len(names)]
            op = ops[name]
            op.enter()
            _sync(device)
            t0 = time.perf_counter()
            op.fn()
            _sync(device)
            dt = time.perf_counter() - t0
            op.leave()
            if rep >= 0:
                out[name].append(dt)
    return out


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _cma_write(pid: int, src_addr: int, dst_addr: int, size: int) -> Callable[[], None]:
    """One process_vm_writev of `size` bytes into process `pid`: the kernel copy UCX's cma transport makes, in
    the writer's thread."""
    libc = ctypes.CDLL(None, use_errno=True)
    local, remote = _IoVec(src_addr, size), _IoVec(dst_addr, size)

    def write() -> None:
        if libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) != size:
            raise OSError(ctypes.get_errno(), "process_vm_writev into the consumer failed")
    return write


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


def run(device: str, repeats: int, max_mib: int = 256, desc_mib: int = 16,
        error_handling: UcxErrorHandling = "peer") -> list[dict]:
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    sizes = [s * MiB for s in (1, 16, 64, 256, 512, 1024) if s <= max_mib]
    total = max(sizes + [desc_mib * MiB, 64 * MiB])  # 64 MiB: the paged workload below
    proc = ctx.Process(target=_consumer, args=(child, total, device, error_handling), daemon=True)
    proc.start()
    meta, raddr, rmem, rdev = conn.recv()
    agent = NixlAgent("bench-producer", error_handling)
    src = zeroed_buffer(total, device).random_(0, 256)
    local = agent.register(src)
    w = _Writer(agent, local, agent.add_remote(meta), raddr, rmem, rdev)
    dst = zeroed_buffer(total, device)
    threads = torch.get_num_threads()

    def tell(mode: str) -> Callable[[], None]:
        def send() -> None:
            conn.send(mode)
            conn.recv()  # "ok": the consumer is in that mode
        return send

    def measured(name: str, nbytes: int, op: Callable[[], None], writes: bool, cma: Callable[[], None] | None = None
                 ) -> dict:
        """`op` paired with memcpy (every thread: torch's copy_; one thread: as UCX copies) and the cma call."""
        ops = {"op": _Op(op, tell("receiving"), tell("idle")) if writes else _Op(op),
               "memcpy": _Op(lambda: dst[:nbytes].copy_(src[:nbytes])),
               "memcpy_1thread": _Op(lambda: dst[:nbytes].copy_(src[:nbytes]), lambda: torch.set_num_threads(1),
                                     lambda: torch.set_num_threads(threads))}
        if cma is not None:
            ops["cma"] = _Op(cma)
        return _row(name, nbytes, _paired(ops, repeats, device))

    rows = []
    for size in sizes:
        cma = _cma_write(proc.pid, local.addr, raddr, size) if device == "cpu" else None
        rows.append(measured(f"contiguous {size // MiB} MiB", size, lambda: w.write([[(0, 0, size)]]), True, cma))
    size, piece = desc_mib * MiB, 64 * 1024
    rows.append(measured(f"{desc_mib} MiB as {size // piece} x 64 KiB descriptors", size,
                         lambda: w.write([[(o, o, piece) for o in range(0, size, piece)]]), True))

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
        rows.append(measured(name, nbytes, fn, writes))
    conn.send("done")
    proc.join(10)
    return [dict(r, ucx_error_handling=agent.error_handling) for r in rows]


def _row(name: str, nbytes: int, t: dict[str, list[float]]) -> dict:
    """GB/s from each op's median time; each ratio (op's GB/s over the reference's) is the median of the
    repeats' own ratios, so it need not equal the quotient of the GB/s columns, with its interval as [low, high]
    (95 %, or `ci_level` where too few repeats give less)."""
    row: dict = {"case": name, "bytes": nbytes, "gb_s": round(nbytes / statistics.median(t["op"]) / 1e9, 2)}
    for ref, gbs_key, ratio_key in (("memcpy", "memcpy_gb_s", "ratio"),
                                    ("memcpy_1thread", "memcpy_1thread_gb_s", "ratio_1thread"),
                                    ("cma", "cma_gb_s", "ratio_cma")):
        if ref in t:
            ci = median_ci([r / o for r, o in zip(t[ref], t["op"])])
            row[gbs_key] = round(nbytes / statistics.median(t[ref]) / 1e9, 2)
            row[ratio_key], row[ratio_key + "_ci"] = round(ci.median, 3), [round(ci.low, 3), round(ci.high, 3)]
            row["ci_level"] = round(ci.level, 3)  # below 0.95 with fewer than 6 repeats (bench/median_ci.py)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--max-mib", type=int, default=256, help="largest contiguous write (1, 16, 256, 512, 1024)")
    ap.add_argument("--desc-mib", type=int, default=16, help="bytes moved as 64 KiB descriptors")
    ap.add_argument("--ucx-error-handling", nargs="+", default=["peer"], choices=list(ERROR_HANDLING),
                    help="UCX error handling of both agents (transfer/ucx_error_handling.py); several: the whole bench "
                         "once for each, in turn, each row saying which")
    args = ap.parse_args(argv)
    if args.json:
        result = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)  # before any agent exists: native logs, and the consumer process, inherit stderr as fd 1
    rows = [r for mode in args.ucx_error_handling
            for r in run(args.device, args.repeats, args.max_mib, args.desc_mib, mode)]
    if args.json:
        result.write(json.dumps(rows, indent=1) + "\n")
        result.close()
        return
    level = min(r["ci_level"] for r in rows)
    print(f"GB/s: from median times; ratios: median of the {args.repeats} paired repeats' own ratios "
          f"[{'95 %' if level >= 0.95 else f'{level:.0%}'} interval]")
    print(f"{'UCX errors':10} {'case':52} {'GB/s':>6} {'memcpy':>6} {'ratio':>21} {'memcpy1t':>8} {'ratio1t':>21} "
          f"{'cma':>6} {'ratio_cma':>21}")

    def ratio(r: dict, key: str) -> str:
        return f"{r[key]:.2f} [{r[key + '_ci'][0]:.2f}, {r[key + '_ci'][1]:.2f}]"
    for r in rows:
        cma = f"{r['cma_gb_s']:6.2f} {ratio(r, 'ratio_cma'):>21}" if "cma_gb_s" in r else ""
        print(f"{r['ucx_error_handling']:10} {r['case']:52} {r['gb_s']:6.2f} {r['memcpy_gb_s']:6.2f} "
              f"{ratio(r, 'ratio'):>21} {r['memcpy_1thread_gb_s']:8.2f} {ratio(r, 'ratio_1thread'):>21} {cma}")


if __name__ == "__main__":
    main()

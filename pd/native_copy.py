"""csrc's segment copy, loaded from the libraries the package's install builds into pd/native/.

A segment table is an array of rows (source address, destination address, bytes). On CPU the C++
library runs it (a memmove loop stands in when the library is missing: same bytes, slower). On a GPU
`CudaCopier` runs it in one kernel launch on the current stream and never waits for that stream: each
table goes into pinned host memory, is uploaded with a non-blocking copy into device memory that
persists, and the pair of buffers is reused only after an event says the kernel that read them is done.
`cuda_copier` runs a small copy once at start-up, so a library built for another GPU ("no kernel image")
is found before the first transfer, not inside it.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np
import torch

NATIVE_DIR = Path(__file__).resolve().parent / "native"
HOW_TO_BUILD = ("reinstall kvbridge where nvcc is on PATH (`pip install -e .` builds csrc into pd/native/), "
                "or run `bash csrc/build.sh`")
log = logging.getLogger("kvbridge.copy")


class NativeUnavailable(RuntimeError):
    """The CUDA copy library is missing or does not run on this GPU; the message says how to fix it."""


def _load(name: str) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(NATIVE_DIR / name))
    except OSError:
        return None


_cpu = _load("libkvb_copy_cpu.so")


def copy_cpu(table: np.ndarray) -> None:
    """Run a segment table whose addresses are host memory."""
    if _cpu is not None:
        cols = [np.ascontiguousarray(table[:, i], dtype=np.uint64) for i in range(3)]
        _cpu.kvb_copy_segments_cpu(*(c.ctypes.data_as(ctypes.c_void_p) for c in cols), ctypes.c_int64(len(table)))
        return
    for a, b, k in table.tolist():
        ctypes.memmove(b, a, k)


class _TableBuffers:
    def __init__(self, rows: int, device: torch.device) -> None:
        self.rows = rows
        self.host = torch.empty(3 * rows, dtype=torch.int64, pin_memory=True)
        self.dev = torch.empty(3 * rows, dtype=torch.int64, device=device)
        self.used: torch.cuda.Event | None = None

    def free(self) -> bool:
        return self.used is None or self.used.query()


class CudaCopier:
    """Segment tables on one CUDA device, queued on the caller's current stream (see the module doc)."""

    def __init__(self, lib: ctypes.CDLL, device: torch.device) -> None:
        self._lib = lib
        self.device = device
        self._ring: list[_TableBuffers] = []

    def _buffers(self, rows: int) -> _TableBuffers:
        for b in self._ring:
            if b.rows >= rows and b.free():
                return b
        b = _TableBuffers(max(rows, 4096), self.device)  # grows only while earlier tables are still queued
        self._ring.append(b)
        return b

    def run(self, table: np.ndarray) -> None:
        n = len(table)
        if n == 0:
            return
        with torch.cuda.device(self.device):  # the launch goes to the thread's current device, the stream is ours
            self._launch(table, n)

    def _launch(self, table: np.ndarray, n: int) -> None:
        buf = self._buffers(n)
        host = buf.host.numpy()
        host[:3 * n] = table.T.reshape(-1).view(np.int64)  # [src...][dst...][len...], as the kernel reads
        stream = torch.cuda.current_stream(self.device)
        buf.dev[:3 * n].copy_(buf.host[:3 * n], non_blocking=True)
        widest = int(table[:, 2].max())
        threads = int(min(512, max(64, 1 << max(0, (widest // 64 - 1).bit_length()))))
        rc = self._lib.kvb_copy_segments_cuda(ctypes.c_void_p(buf.dev.data_ptr()), ctypes.c_int64(n),
                                              ctypes.c_int(threads), ctypes.c_void_p(stream.cuda_stream))
        if rc != 0:
            raise NativeUnavailable(f"kvb_copy_segments_cuda failed with CUDA error {rc}")
        buf.used = torch.cuda.Event()
        buf.used.record(stream)


def cuda_copier(device: torch.device) -> CudaCopier:
    """A copier for `device`, after a copy that proves the library runs on this GPU."""
    lib = _load("libkvb_copy_cuda.so")
    if lib is None:
        raise NativeUnavailable(f"{NATIVE_DIR / 'libkvb_copy_cuda.so'} is missing: {HOW_TO_BUILD}")
    copier = CudaCopier(lib, device)
    src = torch.arange(256, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    try:
        copier.run(np.array([[src.data_ptr(), dst.data_ptr(), 256]], dtype=np.uint64))
        torch.cuda.synchronize(device)  # start-up only: the engine is not running yet
        ok, why = torch.equal(src, dst), "a test copy moved the wrong bytes"
    except NativeUnavailable as e:
        ok, why = False, str(e)
    if not ok:
        cap = torch.cuda.get_device_capability(device)
        raise NativeUnavailable(f"the CUDA copy library does not run on this GPU (sm_{cap[0]}{cap[1]}; {why}): "
                                f"{HOW_TO_BUILD}")
    return copier

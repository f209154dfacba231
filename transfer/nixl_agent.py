"""A small owner-driven wrapper over one NIXL agent (UCX backend), DRAM or VRAM.

The progress thread is off (it spins a whole core); whoever owns the agent drives
progress by polling transfer state and notifications, sleeping when there is nothing
in flight. All calls go through one lock, so the agent can be shared by a control
thread and a data thread.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass

import torch

from transfer.host_buffer import huge_page_buffer, pinned_buffer
from transfer.ucx_error_handling import ERROR_HANDLING, UcxErrorHandling

try:
    from nixl._api import nixl_agent, nixl_agent_config
except ImportError:  # the CUDA-12 / CUDA-13 wheels install their module under these names
    try:
        from nixl_cu12._api import nixl_agent, nixl_agent_config
    except ImportError:
        from nixl_cu13._api import nixl_agent, nixl_agent_config

log = logging.getLogger(__name__)


def _nixl_logs_to_stderr() -> None:
    """NIXL's Python logger prints to stdout; a tool whose stdout is its result (JSON) must not get them."""
    for handler in logging.getLogger("nixl").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


_nixl_logs_to_stderr()


class TransferError(RuntimeError):
    """NIXL refused or failed a transfer; the message names the peer and the step. `peer_gone`: NIXL
    said the remote agent disconnected (its process died), so nothing there can be asked any more."""

    def __init__(self, message: str, peer_gone: bool = False) -> None:
        super().__init__(message)
        self.peer_gone = peer_gone


def is_remote_disconnect(e: BaseException) -> bool:
    """NIXL's error for a peer whose process is gone (NIXL_ERR_REMOTE_DISCONNECT)."""
    return "REMOTE_DISCONNECT" in str(e) or "RemoteDisconnect" in type(e).__name__


@dataclass(frozen=True)
class Region:
    """A registered, contiguous piece of memory (the tensor keeps it alive)."""

    tensor: torch.Tensor
    addr: int
    nbytes: int
    mem_type: str
    dev_id: int
    handle: object


def mem_type_of(t: torch.Tensor) -> tuple[str, int]:
    return ("VRAM", t.device.index or 0) if t.is_cuda else ("DRAM", 0)


def zeroed_buffer(nbytes: int, device: str) -> torch.Tensor:
    """A zeroed byte buffer to register: on `device` ('cpu', 'cuda:0'), or 'pinned' host memory, which a
    GPU's copy kernels reach directly and which takes no GPU memory (plain host memory without a GPU).
    Plain host memory is on huge pages (host_buffer.py: a local write is a page-by-page kernel copy)."""
    if device == "pinned" and torch.cuda.is_available():
        return pinned_buffer(nbytes)
    if device == "pinned" or torch.device(device).type == "cpu":
        return huge_page_buffer(nbytes)
    return torch.zeros(nbytes, dtype=torch.uint8, device=device)


# UCX's cma transport (a host-memory write between processes on one host: process_vm_writev) copies in segments
# of 512 KiB unless told otherwise, one system call each. One segment per write of up to 64 MiB (chunks are at
# most tens of MiB; strace: a 16 MiB write is 1 call instead of 32) made a 64 MiB write 0.92-0.94 x one
# process_vm_writev of the same bytes instead of 0.83-0.88, a 256 MiB one 0.98-0.99 instead of 0.87-0.94
# (bench/transfer_bench.py: two runs with, three without, both error handlings). An operator's own value wins.
CMA_SEG_SIZE = "64m"


class NixlAgent:
    def __init__(self, name: str, error_handling: UcxErrorHandling = "peer") -> None:
        if error_handling not in ERROR_HANDLING:
            raise ValueError(f"UCX error handling must be one of {ERROR_HANDLING}, got {error_handling!r}")
        os.environ.setdefault("UCX_CMA_SEG_SIZE", CMA_SEG_SIZE)  # read when UCX's context is created, below
        self.name = name
        self._lock = threading.Lock()
        cfg = nixl_agent_config(enable_prog_thread=False, backends=[])
        self._agent = nixl_agent(name, cfg)
        self.error_handling = self._create_ucx_backend(error_handling)
        self._remotes: set[str] = set()

    def _create_ucx_backend(self, wanted: UcxErrorHandling) -> str:
        """The UCX backend with `wanted` error handling (transfer/ucx_error_handling.py); the mode it got."""
        if wanted == "peer":
            try:
                self._agent.create_backend("UCX", {"ucx_error_handling_mode": "peer"})
                return "peer"
            except Exception as e:
                log.warning("NIXL agent %s: UCX refused peer error handling with the transports it selected "
                            "(UCX_TLS=%s): %s; running without it, a dead peer is noticed by lease deadlines",
                            self.name, os.environ.get("UCX_TLS", "all"), e)
        self._agent.create_backend("UCX", {"ucx_error_handling_mode": "none"})
        return "none"

    def register(self, tensor: torch.Tensor) -> Region:
        if not tensor.is_contiguous():
            raise ValueError("only contiguous tensors can be registered")
        mem_type, dev = mem_type_of(tensor)
        nbytes = tensor.numel() * tensor.element_size()
        with self._lock:
            handle = self._agent.register_memory([(tensor.data_ptr(), nbytes, dev, "")], mem_type)
        return Region(tensor, tensor.data_ptr(), nbytes, mem_type, dev, handle)

    def deregister(self, region: Region) -> None:
        with self._lock:
            self._agent.deregister_memory(region.handle)

    def metadata(self) -> bytes:
        with self._lock:
            return self._agent.get_agent_metadata()

    def add_remote(self, metadata: bytes) -> str:
        with self._lock:
            name = self._agent.add_remote_agent(metadata)
            name = name.decode() if isinstance(name, bytes) else name
            self._remotes.add(name)
            return name

    def remove_remote(self, name: str) -> None:
        with self._lock:
            if name in self._remotes:
                self._remotes.discard(name)
                self._agent.remove_remote_agent(name)

    def write(self, local: Region, spans: list[tuple[int, int, int]], remote: str,
              remote_mem_type: str, remote_dev: int, notif: bytes) -> object:
        """Post one WRITE of (local_offset, remote_addr, nbytes) spans, with a notification
        delivered to the remote after the bytes. Returns a handle for `poll`."""
        src = [(local.addr + off, n, local.dev_id) for off, _, n in spans]
        dst = [(raddr, n, remote_dev) for _, raddr, n in spans]
        with self._lock:
            ldesc = self._agent.get_xfer_descs(src, local.mem_type)
            rdesc = self._agent.get_xfer_descs(dst, remote_mem_type)
            try:
                handle = self._agent.initialize_xfer("WRITE", ldesc, rdesc, remote, notif)
            except Exception as e:
                raise TransferError(f"cannot start write to {remote}: {e}") from e
            try:
                state = self._agent.transfer(handle)
            except Exception as e:  # NIXL raises (e.g. NIXL_ERR_REMOTE_DISCONNECT) for a peer that died
                state, why, gone = "ERR", f": {type(e).__name__}: {e}", is_remote_disconnect(e)
            else:
                why, gone = "", False
        if state == "ERR":
            try:
                self.release(handle)
            except Exception as e:
                log.info("release of a failed write handle to %s: %s", remote, e)
            raise TransferError(f"write to {remote} failed when posted{why}", peer_gone=gone)
        return handle

    def poll(self, handle: object) -> str:
        """'DONE', 'PROC' or 'ERR'; drives UCX progress. A NIXL error for the transfer is 'ERR'."""
        with self._lock:
            try:
                return self._agent.check_xfer_state(handle)
            except Exception as e:
                log.info("transfer state check failed: %s: %s", type(e).__name__, e)
                return "ERR"

    def release(self, handle: object) -> None:
        with self._lock:
            self._agent.release_xfer_handle(handle)

    def notifications(self) -> dict[str, list[bytes]]:
        """New notifications by sender; calling this also drives receive-side progress."""
        with self._lock:
            return self._agent.get_new_notifs()

"""Host memory for registered regions, backed by transparent huge pages where the kernel allows them.

A local NIXL write between two processes is a kernel copy (UCX's cma transport: process_vm_writev)
that pins the destination's pages and copies page by page, so its speed follows the page size of both
buffers: on 2 MiB pages at both ends a 64 MiB write moved about 1.9x the bytes per second of the same write
on 4 KiB pages (a one-thread memcpy gained 1.3x), and the csrc gather into staging and the scatter out of a
slot touch fewer TLB entries too. Where huge pages are
off (`never`) the same mapping is plain pages: nothing fails, it is only slower.

`pinned_buffer` is the same memory page-locked for a GPU's copy engines (decode slots in host memory, the
store's arena). Not torch's `pin_memory=True`: its caching host allocator rounds each block up to a power of
two, so a 40 GiB region would lock 64 GiB of the host's memory.
"""
from __future__ import annotations

import logging
import mmap

import torch

log = logging.getLogger("kvbridge.memory")
_REGISTERED: list[torch.Tensor] = []  # page-locked buffers, kept for the life of the process

HUGE_PAGE = 2 << 20


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """`nbytes` of zeroed host memory starting on a 2 MiB boundary, asked to be on huge pages; the
    tensor keeps its mapping alive and the mapping is unmapped when the last view of it goes."""
    if nbytes <= 0:
        raise ValueError(f"a host buffer needs a positive size, got {nbytes} bytes")
    # Private: huge pages for shared anonymous memory depend on a separate, usually-off setting.
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        area.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(area, dtype=torch.uint8)
    skip = -whole.data_ptr() % HUGE_PAGE
    buf = whole[skip:skip + nbytes]
    buf.zero_()  # faults every page in now (as huge pages), not during the first transfer
    return buf


def pinned_buffer(nbytes: int) -> torch.Tensor:
    """`huge_page_buffer(nbytes)` page-locked for CUDA (cudaHostRegister) for the life of the process: the
    slot region and the arena it is made for live as long as their process. Where the registration is refused,
    torch's pinned allocator instead (with its rounding), and a warning that says so."""
    buf = huge_page_buffer(nbytes)
    try:
        rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
        error = int(getattr(rc, "value", rc))
    except (AttributeError, RuntimeError) as e:
        error = str(e)
    if error == 0:
        _REGISTERED.append(buf)  # never unmapped while registered: the pages would stay locked, unreachable
        return buf
    log.warning("cannot page-lock %d bytes of host memory (cudaHostRegister: %s); using torch's pinned allocator, "
                "which locks up to twice as much (rounded up to a power of two)", nbytes, error)
    del buf  # unmapped before the replacement is allocated: the two never hold the host's memory at once
    return torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)

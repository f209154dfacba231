"""Registered host buffers (transfer/host_buffer.py): zeroed, the exact size, on a 2 MiB boundary, on huge
pages where the kernel offers them to a process that asks, and unmapped once the last view goes."""
from __future__ import annotations

import gc
import re

import pytest
import torch

from transfer.host_buffer import HUGE_PAGE, huge_page_buffer, pinned_buffer
from transfer.nixl_agent import zeroed_buffer


def _vm_size_kb() -> int:
    return int(re.search(r"VmSize:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _huge_kb_of(addr: int) -> int:
    """AnonHugePages of the mapping that holds `addr`."""
    smaps = open("/proc/self/smaps").read()
    for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) .*?AnonHugePages:\s+(\d+) kB", smaps, re.M | re.S):
        if int(m.group(1), 16) <= addr < int(m.group(2), 16):
            return int(m.group(3))
    return 0


def test_buffer_is_zeroed_exact_and_aligned():
    buf = huge_page_buffer(3 * HUGE_PAGE + 12345)
    assert buf.dtype == torch.uint8 and buf.numel() == 3 * HUGE_PAGE + 12345
    assert buf.data_ptr() % HUGE_PAGE == 0
    assert int(buf.count_nonzero()) == 0


def test_buffer_is_on_huge_pages_where_the_kernel_allows():
    thp_off = "[never]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    buf = huge_page_buffer(8 * HUGE_PAGE)
    if thp_off:  # the same mapping on plain pages: usable, only slower
        assert _huge_kb_of(buf.data_ptr()) == 0 and int(buf.count_nonzero()) == 0
    else:
        assert _huge_kb_of(buf.data_ptr()) >= 2048  # at least one 2 MiB page (all 8 unless memory is fragmented)


def test_a_view_keeps_the_mapping_and_the_last_one_frees_it():
    huge_page_buffer(HUGE_PAGE)
    gc.collect()
    before = _vm_size_kb()
    view = huge_page_buffer(64 * HUGE_PAGE)[10:20]
    gc.collect()
    view.fill_(7)  # the whole buffer's name is gone: the view still owns live memory
    assert int(view.sum()) == 70
    del view
    gc.collect()
    assert _vm_size_kb() <= before


def test_host_devices_get_huge_page_buffers():
    for device in ("cpu", "pinned") if not torch.cuda.is_available() else ("cpu",):
        assert zeroed_buffer(HUGE_PAGE + 1, device).data_ptr() % HUGE_PAGE == 0
    with pytest.raises(ValueError, match="positive size"):
        huge_page_buffer(0)


class FakeCudart:
    def __init__(self, answer: int) -> None:
        self.answer, self.calls = answer, []

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:
        self.calls.append((ptr, nbytes, flags))
        return self.answer


def test_a_pinned_buffer_locks_exactly_its_own_pages_not_a_power_of_two(monkeypatch):
    """torch's pin_memory=True rounds each block up to a power of two: 40 GiB of slots locked 64 GiB."""
    cudart = FakeCudart(0)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    nbytes = 3 * HUGE_PAGE + 5
    buf = pinned_buffer(nbytes)
    assert cudart.calls == [(buf.data_ptr(), nbytes, 0)] and buf.numel() == nbytes and buf.data_ptr() % HUGE_PAGE == 0


def test_a_refused_registration_falls_back_to_torchs_pinned_memory_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(2))  # cudaErrorMemoryAllocation
    monkeypatch.setattr(torch, "zeros", lambda n, dtype, pin_memory: ("torch-pinned", n, pin_memory))
    assert pinned_buffer(4096) == ("torch-pinned", 4096, True)
    assert "cannot page-lock 4096 bytes" in caplog.text

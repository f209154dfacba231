"""csrc's copy libraries: built by the package's install, found where the package is, and moving exactly
the bytes a segment table names (the CUDA library is compiled with warnings as errors wherever nvcc is,
and checked against the CPU path where torch sees a GPU: tests/test_cache_layouts.py)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pd import native_copy

ROOT = Path(__file__).resolve().parent.parent


def test_native_libraries_are_built_inside_the_package():
    assert native_copy._cpu is not None, f"{native_copy.NATIVE_DIR} has no CPU library: {native_copy.HOW_TO_BUILD}"
    if shutil.which("nvcc"):
        assert (native_copy.NATIVE_DIR / "libkvb_copy_cuda.so").exists()


def test_a_segment_table_moves_exactly_the_named_bytes():
    src = torch.randint(0, 256, (4096,), dtype=torch.uint8)
    dst = torch.zeros(4096, dtype=torch.uint8)
    s, d = src.data_ptr(), dst.data_ptr()
    native_copy.copy_cpu(np.array([[s + 10, d + 2000, 300], [s, d, 7], [s + 4000, d + 100, 96]], dtype=np.uint64))
    want = torch.zeros(4096, dtype=torch.uint8)
    want[2000:2300], want[0:7], want[100:196] = src[10:310], src[0:7], src[4000:4096]
    assert torch.equal(dst, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs csrc's kernel on a GPU")
def test_cuda_copier_reuses_table_buffers_only_after_their_kernel_ran():
    dev = torch.device("cuda")
    copier = native_copy.cuda_copier(dev)
    src = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device=dev)
    outs = [torch.zeros_like(src) for _ in range(8)]
    for o in outs:  # queued back to back behind each other: every table must survive until its kernel ran
        copier.run(np.array([[src.data_ptr() + i * 4096, o.data_ptr() + i * 4096, 4096] for i in range(256)],
                            dtype=np.uint64))
    torch.cuda.synchronize()
    assert all(torch.equal(o, src) for o in outs)


@pytest.mark.timeout(300)
def test_building_the_wheel_builds_the_native_libraries_into_it(tmp_path):
    """What `pip install .` runs on a fresh machine: the wheel must carry pd/native (CUDA too where nvcc is)."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, timeout=280)
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("kvbridge-*.whl"))).namelist()
    assert "pd/native/libkvb_copy_cpu.so" in names
    if shutil.which("nvcc"):
        assert "pd/native/libkvb_copy_cuda.so" in names


def test_a_missing_cuda_library_is_a_sentence_that_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setattr(native_copy, "NATIVE_DIR", tmp_path)
    with pytest.raises(native_copy.NativeUnavailable, match="libkvb_copy_cuda.so is missing: reinstall kvbridge"):
        native_copy.cuda_copier(torch.device("cuda"))


def test_without_the_native_copy_the_connector_falls_back_to_torch_with_a_warning(monkeypatch, caplog):
    from pd import block_copy

    def unavailable(*_):
        raise native_copy.NativeUnavailable("libkvb_copy_cuda.so is missing: " + native_copy.HOW_TO_BUILD)
    monkeypatch.setattr(block_copy, "SegmentBlockCopy", unavailable)
    views = [torch.zeros(4, 2, 16, 8)]
    with caplog.at_level("WARNING", logger="kvbridge.copy"):
        copier = block_copy.block_copy_for(views, torch.device("cpu"))
    assert isinstance(copier, block_copy.TorchBlockCopy)
    assert "torch index copies" in caplog.text and "pip install -e ." in caplog.text

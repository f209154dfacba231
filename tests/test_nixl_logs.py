"""NIXL's own log lines go to stderr, so a tool's stdout (`python -m bench.transfer_bench --json`) is its
result alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def test_creating_an_agent_prints_nothing_on_stdout():
    code = "from transfer.nixl_agent import NixlAgent; NixlAgent('quiet'); print('{}')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout == "{}\n"
    assert "Initialized NIXL agent: quiet" in out.stderr  # still logged, on the other stream


def test_bench_json_stdout_is_json_alone_even_with_ucx_printing():
    """UCX's own lines (here its protocol tables, which it prints on stdout) come from native code in both
    bench processes: with --json they must land on stderr."""
    env = {**os.environ, "UCX_PROTO_INFO": "y"}
    out = subprocess.run([sys.executable, "-m", "bench.transfer_bench", "--json", "--repeats", "1", "--max-mib", "1",
                          "--desc-mib", "1"], capture_output=True, text=True, timeout=300, check=True, env=env)
    rows = json.loads(out.stdout)
    assert [r["case"] for r in rows][:2] == ["contiguous 1 MiB", "1 MiB as 16 x 64 KiB descriptors"]
    assert rows[0]["cma_gb_s"] > 0 and rows[0]["ratio_cma"] > 0  # the cross-process kernel copy beside it
    assert "remote memory write" in out.stderr  # UCX did print its tables: they went to stderr

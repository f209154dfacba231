"""NIXL's own log lines go to stderr, so a tool's stdout (`python -m bench.transfer_bench --json`) is its
result alone."""
from __future__ import annotations

import subprocess
import sys


def test_creating_an_agent_prints_nothing_on_stdout():
    code = "from transfer.nixl_agent import NixlAgent; NixlAgent('quiet'); print('{}')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout == "{}\n"
    assert "Initialized NIXL agent: quiet" in out.stderr  # still logged, on the other stream

"""What the lease fence (transfer/notice.py, transfer/quarantine.py) relies on, with real NIXL over a real cut
link: a WRITE posted before the link went down lands when it comes back, long after its producer released the
write's handle and after the consumer handed its slots to someone else; and a fence the producer sent after
releasing it arrives only after the last of those bytes. Nor does the consumer forgetting the producer (removing
its NIXL agent) keep those bytes out: only the fence says they are all in. Two hosts on one box (launch/netns.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from launch import netns
from launch.netns import LinkShape, Network
from launch.placement import transport_env
from launch.polling import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NBYTES = 2 << 20


@pytest.mark.skipif(netns.unavailable() is not None, reason=f"not run: {netns.unavailable()}")
@pytest.mark.parametrize("forget", [False, True], ids=["kept", "producer_forgotten"])
def test_a_write_held_by_a_cut_link_lands_late_and_its_fence_after_it(tmp_path, forget):
    if forget:
        (tmp_path / "forget").touch()
    with Network(["pa", "pb"], LinkShape(rate="8mbit")) as net:
        def start(host: str, role: str) -> subprocess.Popen:
            cmd = net.command(host, [sys.executable, "-m", "tests.late_write_peer", role, str(tmp_path), str(NBYTES)])
            log = open(tmp_path / f"{role}.log", "w")  # NIXL's and UCX's lines, read when a wait fails
            return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **transport_env(net, host)},
                                    stdout=log, stderr=subprocess.STDOUT)
        peers = [start("pb", "consumer"), start("pa", "producer")]
        try:
            wait_for(lambda: (tmp_path / "posted").exists(), 60, 0.01, "the write posted")
            wait_for(lambda: net.received("pa", "pb") > 256 << 10, 30, 0.01, "bytes arriving")
            net.set_link("pa", "pb", up=False)
            time.sleep(1.0)
            (tmp_path / "release").touch()  # the producer gives up: handle released, fence sent
            time.sleep(1.0)
            (tmp_path / "zero").touch()  # the consumer reuses the slots
            time.sleep(1.0)
            net.set_link("pa", "pb", up=True)
            if forget:  # the fence is the forgotten agent's notification: whether it comes is not the point here
                wait_for(lambda: (tmp_path / "late").exists() or peers[0].poll() is not None, 60, 0.05,
                         "a byte landing in the reused slots")
            else:
                wait_for(lambda: (tmp_path / "fenced").exists(), 60, 0.05, "the fence arriving")
                time.sleep(0.5)  # a byte landing after the fence would show here
        finally:
            (tmp_path / "stop").touch()
            for p in peers:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:  # stuck: no process outlives the test
                    p.kill()
                    p.wait(10)
    events = json.loads((tmp_path / "events").read_text())
    zeroed = next(t for kind, t, _ in events if kind == "zeroed")
    landed = [(t, n) for kind, t, n in events if kind == "bytes" and t > zeroed]
    assert landed, f"no byte landed after the slots were reused: {events}"
    assert forget == any(kind == "forgotten" for kind, _, _ in events), events
    if not forget:
        fence = next(t for kind, t, _ in events if kind == "fence")
        assert fence >= landed[-1][0], f"the fence came before the last late byte: {events}"

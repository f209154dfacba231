"""What the lease fence (transfer/notice.py, transfer/quarantine.py) relies on, with real NIXL over a real cut
link: a WRITE posted before the link went down lands when it comes back, long after its producer released the
write's handle and after the consumer handed its slots to someone else; and a fence the producer sent after
releasing it arrives only after the last of those bytes. Nor does the consumer forgetting the producer (removing
its NIXL agent) keep those bytes out: only the fence says they are all in. What does: the producer's TCP giving up
on the cut connection (transfer/write_hold.py), which drops them. Two hosts on one box (launch/netns.py)."""
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
from transfer.write_hold import write_hold_s

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NBYTES = 2 << 20


NOT_HERE = netns.unavailable()


def start(net: Network, tmp_path, host: str, role: str) -> subprocess.Popen:
    cmd = net.command(host, [sys.executable, "-m", "tests.late_write_peer", role, str(tmp_path), str(NBYTES)])
    log = open(tmp_path / f"{role}.log", "w")  # NIXL's and UCX's lines, read when a wait fails
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **transport_env(net, host)}, stdout=log,
                            stderr=subprocess.STDOUT)


def cut_write_reuse(net: Network, tmp_path, down_s: float, after_up) -> list:
    """Post the write from pa to pb, cut the link once bytes flow, release the write (the producer's fence
    follows it), reuse the slots, bring the link back after `down_s` seconds, run `after_up(peers)`, and return
    the consumer's events."""
    peers = [start(net, tmp_path, "pb", "consumer"), start(net, tmp_path, "pa", "producer")]
    try:
        wait_for(lambda: (tmp_path / "posted").exists(), 60, 0.01, "the write posted")
        wait_for(lambda: net.received("pa", "pb") > 256 << 10, 30, 0.01, "bytes arriving")
        net.set_link("pa", "pb", up=False)
        time.sleep(1.0)
        (tmp_path / "release").touch()  # the producer gives up: handle released, fence sent
        time.sleep(1.0)
        (tmp_path / "zero").touch()  # the consumer reuses the slots
        time.sleep(down_s - 2.0)
        net.set_link("pa", "pb", up=True)
        after_up(peers)
    finally:
        (tmp_path / "stop").touch()
        for p in peers:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:  # stuck: no process outlives the test
                p.kill()
                p.wait(10)
    return json.loads((tmp_path / "events").read_text())


def landed_after_reuse(events: list) -> list:
    zeroed = next(t for kind, t, _ in events if kind == "zeroed")
    return [(t, n) for kind, t, n in events if kind == "bytes" and t > zeroed]


@pytest.mark.skipif(NOT_HERE is not None, reason=f"not run: {NOT_HERE}")
@pytest.mark.parametrize("forget", [False, True], ids=["kept", "producer_forgotten"])
def test_a_write_held_by_a_cut_link_lands_late_and_its_fence_after_it(tmp_path, forget):
    if forget:
        (tmp_path / "forget").touch()

    def after_up(peers: list) -> None:
        if forget:  # the fence is the forgotten agent's notification: whether it comes is not the point here
            wait_for(lambda: (tmp_path / "late").exists() or peers[0].poll() is not None, 60, 0.05,
                     "a byte landing in the reused slots")
        else:
            wait_for(lambda: (tmp_path / "fenced").exists(), 60, 0.05, "the fence arriving")
            time.sleep(0.5)  # a byte landing after the fence would show here
    with Network(["pa", "pb"], LinkShape(rate="8mbit")) as net:
        events = cut_write_reuse(net, tmp_path, 3.0, after_up)
    landed = landed_after_reuse(events)
    assert landed, f"no byte landed after the slots were reused: {events}"
    assert forget == any(kind == "forgotten" for kind, _, _ in events), events
    if not forget:
        fence = next(t for kind, t, _ in events if kind == "fence")
        assert fence >= landed[-1][0], f"the fence came before the last late byte: {events}"


@pytest.mark.skipif(NOT_HERE is not None, reason=f"not run: {NOT_HERE}")
@pytest.mark.parametrize("retries2", [3, 15])
def test_a_write_held_past_its_producers_tcp_give_up_never_lands(tmp_path, retries2):
    """The bound transfer/write_hold.py gives: with net.ipv4.tcp_retries2=3 on the producer's host, its TCP gives up
    on a connection cut for longer than write_hold_s(3) and drops the held bytes; UCX does not send them again
    once the link is back. With Linux's default, 15, the same cut lands them."""
    with Network(["pa", "pb"], LinkShape(rate="8mbit")) as net:
        subprocess.run(net.command("pa", ["sysctl", "-qw", f"net.ipv4.tcp_retries2={retries2}"]), check=True)
        events = cut_write_reuse(net, tmp_path, write_hold_s(3) + 2.0, lambda peers: time.sleep(10.0))
    assert any(kind == "zeroed" for kind, _, _ in events), events
    landed = landed_after_reuse(events)
    assert bool(landed) == (write_hold_s(retries2) > write_hold_s(3) + 2.0), f"tcp_retries2={retries2}: {events}"

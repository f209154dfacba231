"""How late a write held by a cut link can still land: how long its producer's TCP retransmits before giving up.

A write posted before a link was cut lands when the link comes back (TCP keeps the unacknowledged bytes and
retransmits them), however late, as long as TCP has not given up on the connection; once it has (after
`net.ipv4.tcp_retries2` retransmissions on the producer's host), it drops them, and UCX does not send them again
on another connection (both in tests/test_late_write.py). So a consumer that rests an unanswered lease's slots
(quarantine.py) for at least this long past the lease's deadline cannot get that lease's bytes in them later. The
producer tells its consumers its host's setting in its hello, and a consumer that listens beyond loopback rests
each producer's unanswered leases that long at least (one that listens on loopback only has producers on its own
host alone, with no link to cut, and reckons 0), saying so at the handshake when that is longer than its
`fence_timeout_s`, with how to shorten it: a lower `tcp_retries2` in the producer's network namespace (in
Kubernetes a pod sysctl the kubelet must allow: `--allowed-unsafe-sysctls`).

Linux times the give-up by a model (`tcp_give_up_s`), from the first retransmission: timeouts from 200 ms
(TCP_RTO_MIN), doubling, each at most 120 s (TCP_RTO_MAX); the default 15 retransmissions give 924.6 s. But the
timer fires at the connection's own timeouts, from its RTO r (200 ms plus about its round trip), and the kernel
checks the span only when one fires: the first retransmission comes r after the cut, each wait is the elapsed time
plus 2r (doubling) or 120 s, so TCP lets go at most the span + min(the span, 120 s) + 3r after the cut.
`write_hold_s` takes r <= `RTO_ASSUMED_S` (1 s: round trips well under a second; a link slower than that needs a
longer `fence_timeout_s`). It counts from the lease's deadline, when the producer stops posting to it; bytes it
posted before then that are still queued behind a slow link keep going out after it, and a cut that comes while
they do starts TCP's count later, by as much. The producer reads the setting when it starts: a change takes effect
at its next start. The consumer tells a producer's host by where it listens, not by the data path: a loopback
listener reached through a forwarder (a port-forward, an ssh tunnel) would take a remote producer for a local one.

A restart shortens the rest (quarantine.py) because the new generation's hello shows the old connection's link is
back; that holds only if it came from the same host, so the hello also carries the kernel's boot id, and a restart
from another kernel (a pod rescheduled to another node under the same name) leaves the old leases their full rest.
"""
from __future__ import annotations

import math

RTO_MIN_S = 0.2
RTO_MAX_S = 120.0
RTO_ASSUMED_S = 1.0  # the largest RTO of a producer's connection that write_hold_s covers
LINUX_DEFAULT_RETRIES2 = 15
_LINEAR_FROM = int(math.log2(RTO_MAX_S / RTO_MIN_S))  # retransmissions after which every timeout is RTO_MAX_S


def tcp_give_up_s(retries2: int) -> float:
    """Linux's model of how long TCP retransmits before giving up, for `net.ipv4.tcp_retries2` = `retries2`."""
    if retries2 <= _LINEAR_FROM:
        return ((2 << retries2) - 1) * RTO_MIN_S
    return ((2 << _LINEAR_FROM) - 1) * RTO_MIN_S + (retries2 - _LINEAR_FROM) * RTO_MAX_S


def write_hold_s(retries2: int) -> float:
    """Seconds past its producer's last chance to post it (the lease's deadline) that a write held by a cut link
    may still land, for a producer host with `net.ipv4.tcp_retries2` = `retries2`."""
    span = tcp_give_up_s(retries2)
    return span + min(span, RTO_MAX_S) + 3 * RTO_ASSUMED_S


def host_facts() -> dict:
    """What a producer's hello says of its host: `tcp_retries2` and the kernel's `boot_id` ("" if unreadable)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()[:64]
    except OSError:
        boot_id = ""
    return {"tcp_retries2": local_tcp_retries2(), "boot_id": boot_id}


def local_tcp_retries2() -> int:
    """This host's `net.ipv4.tcp_retries2` (in this network namespace), Linux's default where it cannot be read."""
    try:
        with open("/proc/sys/net/ipv4/tcp_retries2") as f:
            return min(max(int(f.read()), 0), 255)  # what a hello carries
    except (OSError, ValueError):
        return LINUX_DEFAULT_RETRIES2


def retries2_within(seconds: float) -> int | None:
    """The largest `net.ipv4.tcp_retries2` whose `write_hold_s` is at most `seconds` (None: not even 0's)."""
    fits = [r for r in range(256) if write_hold_s(r) <= seconds]
    return fits[-1] if fits else None


def held_rest(producer_id: str, retries2: int, fence_timeout_s: float) -> str:
    """What a consumer tells its operator when a producer's hold makes its unanswered leases rest longer than
    `fence_timeout_s`, and how to shorten that."""
    fits = retries2_within(fence_timeout_s)
    lower = f" (<= {fits} brings it within fence_timeout_s, {fence_timeout_s:g} s)" if fits is not None else ""
    return (f"producer {producer_id}: slots of its leases that end with no word from it rest "
            f"{write_hold_s(retries2):.0f} s past their deadline, as long as its host's TCP may still land a write a "
            f"cut link holds (net.ipv4.tcp_retries2={retries2} there when it started); a lower tcp_retries2 in its "
            f"network namespace shortens that from its next start{lower}")

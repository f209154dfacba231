"""Hosts on one box: Linux network namespaces joined by shaped point-to-point links.

Each host is a namespace with `lo` up and one address from the benchmarking range 198.18.0.0/15
(never routed on a real network), set on every one of its link devices; every pair of hosts gets its
own veth pair, named `to-<peer>` on each side, with a route to the peer's address through it. So the
prefill-decode link can be shaped, cut and restored without touching the router's links, and a
server bound to its host's address is reached only over the links this module made.

Namespaces are named `kvb<pid>-<host>`: a network whose owner died (kill -9, a crashed test run)
is found by that pid and removed by the next `Network` or by `python -m launch.netns clean`.

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and the `ip` and `tc` tools; `unavailable()` says
why they are not usable here.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    from launch.tap_wire import TapWire

ADDRESS_RANGE = ipaddress.ip_network("198.18.0.0/15")
_PREFIX = "kvb"
_NAME = re.compile(rf"^{_PREFIX}(\d+)-")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """A namespace, link or shaping command failed; carries the command and what it printed."""


@dataclass(frozen=True)
class Host:
    name: str
    namespace: str
    address: str

    def device_to(self, peer: str) -> str:
        return f"to-{peer}"


def unavailable() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip` or `tc`), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (creating them, and entering them to reach their servers)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"network namespaces need the iproute2 tools; not found: {missing}"
    return None


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale() -> list[str]:
    """Delete kvbridge namespaces whose owning process is gone; their names."""
    stale = [ns for ns in _namespaces() if (m := _NAME.match(ns)) and not pid_alive(int(m.group(1)))]
    for ns in stale:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    return stale


@dataclass(frozen=True)
class LinkShape:
    """One direction of a link: `rate` like '10gbit', `delay` like '50us', `loss` in %. A rate alone is
    a token bucket (tbf); delay or loss need netem, which some kernels are built without."""
    rate: str | None = None
    delay: str | None = None
    loss: float = 0.0

    def qdisc_args(self) -> list[str]:
        """The `tc qdisc replace ... root` arguments; [] for an unshaped link."""
        if self.delay or self.loss:
            return (["netem"] + (["delay", self.delay] if self.delay else []) +
                    (["loss", f"{self.loss}%"] if self.loss else []) + (["rate", self.rate] if self.rate else []))
        if self.rate:  # a bucket of 1 ms at the rate: the kernel's timers refill it often enough
            return ["tbf", "rate", self.rate, "burst", str(max(64 * 1024, _bits(self.rate) // 8000)), "latency", "10ms"]
        return []


def _seconds(delay: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(us|ms|s)", delay)
    if not m:
        raise ValueError(f"delay {delay!r}: expected a number and us, ms or s")
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]


def _bits(rate: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if not m:
        raise ValueError(f"rate {rate!r}: expected a number and kbit, mbit, gbit or bit")
    return int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2)])


class Network:
    """Namespaces for `hosts` and a veth pair between every two of them; `close()` (or leaving the
    `with` block) deletes them all, including after an error or Ctrl-C in the block."""

    def __init__(self, hosts: Sequence[str], shape: LinkShape | None = None, first_address: int = 1,
                 wired: Sequence[tuple[str, str]] = ()) -> None:
        """`wired`: host pairs whose link is emulated in this process (launch/tap_wire.py) instead of a
        veth pair, so delay and loss work without netem."""
        if len(set(hosts)) != len(hosts) or not hosts:
            raise ValueError(f"host names must be distinct and at least one: {list(hosts)}")
        bad = [h for h in hosts if not re.fullmatch(r"[a-z][a-z0-9]{0,10}", h)]
        if bad:
            raise ValueError(f"host names must be 1-11 lowercase letters/digits (device names are `to-<peer>`): {bad}")
        clean_stale()
        tag = f"{_PREFIX}{os.getpid()}"
        base = ADDRESS_RANGE.network_address + first_address
        self.hosts = {h: Host(h, f"{tag}-{h}", str(base + i)) for i, h in enumerate(hosts)}
        self._made: list[str] = []
        self._wires: dict[frozenset[str], tuple[str, TapWire]] = {}  # pair -> (its first host, wire)
        try:
            for host in self.hosts.values():
                self._make_host(host)
            for a, b in itertools.combinations(self.hosts.values(), 2):
                self._make_link(a, b, (a.name, b.name) in wired or (b.name, a.name) in wired)
            if shape is not None:
                for a, b in itertools.permutations(self.hosts, 2):
                    self.shape(a, b, shape)
        except BaseException:
            self.close()
            raise

    @classmethod
    def existing(cls, hosts: dict[str, Host]) -> Network:
        """The network another process made (`kvbridge up`), to reach its hosts; close() leaves it as it is."""
        net = cls.__new__(cls)
        net.hosts, net._made, net._wires = hosts, [], {}
        return net

    def _make_host(self, host: Host) -> None:
        _run("ip", "netns", "add", host.namespace)
        self._made.append(host.namespace)
        _run("ip", "-n", host.namespace, "link", "set", "dev", "lo", "up")

    def _make_link(self, a: Host, b: Host, wired: bool) -> None:
        if wired:
            from launch.tap_wire import MTU, TapWire
            self._wires[frozenset((a.name, b.name))] = (a.name, TapWire(a.namespace, a.device_to(b.name),
                                                                        b.namespace, b.device_to(a.name)))
            for here, there in ((a, b), (b, a)):
                _run("ip", "-n", here.namespace, "link", "set", "dev", here.device_to(there.name), "mtu", str(MTU))
        else:
            _run("ip", "link", "add", "name", a.device_to(b.name), "netns", a.namespace, "type", "veth",
                 "peer", "name", b.device_to(a.name), "netns", b.namespace)
        for here, there in ((a, b), (b, a)):
            dev = here.device_to(there.name)
            _run("ip", "-n", here.namespace, "addr", "add", f"{here.address}/32", "dev", dev)
            _run("ip", "-n", here.namespace, "link", "set", "dev", dev, "up")
            _run("ip", "-n", here.namespace, "route", "add", f"{there.address}/32", "dev", dev, "src", here.address)

    def devices(self, host: str) -> list[str]:
        """The host's link devices (for UCX_NET_DEVICES)."""
        return [self.hosts[host].device_to(peer) for peer in self.hosts if peer != host]

    def command(self, host: str, cmd: Sequence[str]) -> list[str]:
        """`cmd` as run inside `host` (the child execs in place: its pid is the command's)."""
        return ["ip", "netns", "exec", self.hosts[host].namespace, *cmd]

    def shape(self, a: str, b: str, shape: LinkShape) -> None:
        """Shape what `a` sends to `b` (both directions: call it twice). An empty shape removes it."""
        dev, ns = self.hosts[a].device_to(b), self.hosts[a].namespace
        wire = self._wires.get(frozenset((a, b)))
        if wire is not None:  # delay and loss on the wire, a rate still in the kernel
            first, tap = wire
            tap.set(a == first, _seconds(shape.delay) if shape.delay else 0.0, shape.loss / 100)
            shape = LinkShape(rate=shape.rate)
        args = shape.qdisc_args()
        if args:
            try:
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", *args)
            except NetnsError as e:
                if args[0] == "netem" and "unknown" in str(e):
                    raise NetnsError(f"{shape}: delay and loss need netem, and this kernel has no sch_netem") from None
                raise
        else:
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)

    def received(self, a: str, b: str) -> int:
        """Bytes `b` has received over its link from `a` (the device's counter)."""
        host = self.hosts[b]
        shown = _run("ip", "-n", host.namespace, "-j", "-s", "link", "show", "dev", host.device_to(a))
        return int(json.loads(shown)[0]["stats64"]["rx"]["bytes"])

    def set_link(self, a: str, b: str, up: bool) -> None:
        """Take `b`'s end of the a-b link down (or up): `a` loses carrier and what it sends to `b` is
        dropped without any error reaching `a` (a pulled cable as `a` sees it); `b` cannot send to `a`."""
        host = self.hosts[b]
        _run("ip", "-n", host.namespace, "link", "set", "dev", host.device_to(a), "up" if up else "down")
        if up:  # the route through a device goes with the device
            subprocess.run(["ip", "-n", host.namespace, "route", "replace", f"{self.hosts[a].address}/32", "dev",
                            host.device_to(a), "src", host.address], capture_output=True)

    def set_host_reachable(self, host: str, up: bool) -> None:
        """Every link of `host` down (or up) at its own end: the host vanishes from the network while its
        processes keep running."""
        for peer in self.hosts:
            if peer != host:
                self.set_link(peer, host, up)

    def close(self) -> None:
        for _, wire in self._wires.values():
            wire.close()
        self._wires.clear()
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        self._made.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def entered(namespace: str | None) -> Iterator[None]:
    """Run the block's socket calls from inside `namespace` (this thread only; None: stay where we are).
    A socket keeps the namespace it was created in, so create and use it inside the block."""
    if namespace is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise NetnsError(f"cannot enter namespace {namespace}: {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            _libc.setns(own, _CLONE_NEWNET)
    finally:
        os.close(own)
        os.close(target)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m launch.netns up prefill decode router [--rate 10gbit --delay 50us]`: make the hosts,
    print them, keep them until Ctrl-C; `python -m launch.netns clean`: remove namespaces left by dead runs."""
    ap = argparse.ArgumentParser(prog="python -m launch.netns")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="make namespaces for HOSTS, linked pairwise, until Ctrl-C")
    up.add_argument("hosts", nargs="+")
    up.add_argument("--rate")
    up.add_argument("--delay")
    up.add_argument("--loss", type=float, default=0.0)
    sub.add_parser("clean", help="delete namespaces whose owning process is gone")
    args = ap.parse_args(argv)
    why = unavailable()
    if why:
        raise SystemExit(why)
    if args.cmd == "clean":
        print("removed:", " ".join(clean_stale()) or "nothing")
        return
    with Network(args.hosts, LinkShape(args.rate, args.delay, args.loss)) as net:
        for h in net.hosts.values():
            print(f"{h.name}: namespace {h.namespace}, address {h.address}, devices {net.devices(h.name)}; "
                  f"run with: ip netns exec {h.namespace} CMD")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

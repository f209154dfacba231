"""A link emulated in user space: two TAP devices, one in each namespace, and threads in this process
that carry each frame from one to the other after a fixed delay, dropping a share of them at random.

For kernels built without netem (delay and loss on a veth need it): the same link as netns.py's veth
pairs as the hosts see it (a device `to-<peer>` with the host's address and a route through it), with
delay and loss that can change while servers use it. Rate is still a tbf on the device. The wire lives
as long as this process and its Network: frames only move while the owning process runs.
"""
from __future__ import annotations

import collections
import fcntl
import os
import random
import select
import struct
import threading
import time

from launch.netns import entered

_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI = 0x0002, 0x1000
MTU = 9000


def open_tap(namespace: str, name: str) -> int:
    """A TAP device `name` created inside `namespace`; its frames are read and written through the fd."""
    with entered(namespace):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
    return fd


class _Direction:
    """Frames from one TAP to the other: a reader queues each with its due time, a writer delivers it."""

    def __init__(self, src: int, dst: int) -> None:
        self.src, self.dst = src, dst
        self.delay_s, self.loss = 0.0, 0.0
        self.dropped = 0
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._ready = threading.Condition()
        self.closed = False
        self._threads = [threading.Thread(target=t, daemon=True) for t in (self._read, self._write)]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        while not self.closed:
            if not select.select([self.src], [], [], 0.2)[0]:  # wakes to notice close()
                continue
            try:
                frame = os.read(self.src, MTU + 64)
            except OSError:  # the device is down
                time.sleep(0.05)
                continue
            if self.loss and random.random() < self.loss:
                self.dropped += 1
                continue
            with self._ready:
                self._queue.append((time.monotonic() + self.delay_s, frame))
                self._ready.notify()

    def _write(self) -> None:
        while not self.closed:
            with self._ready:
                while not self._queue and not self.closed:
                    self._ready.wait(0.5)
                if self.closed:
                    return
                due, frame = self._queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._ready.wait(wait)
                    continue
                self._queue.popleft()
            try:
                os.write(self.dst, frame)
            except OSError:  # the far device is down: the frame is lost, as on a cut cable
                pass

    def close(self) -> None:
        with self._ready:
            self.closed = True
            self._ready.notify_all()
        for t in self._threads:
            t.join(2)


class TapWire:
    """The link between `a` (its device `dev_a` in `ns_a`) and `b`; `set(a_to_b, delay_s, loss)` shapes
    one direction (loss as a fraction)."""

    def __init__(self, ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
        self._fds = [open_tap(ns_a, dev_a), open_tap(ns_b, dev_b)]
        self.directions = (_Direction(self._fds[0], self._fds[1]), _Direction(self._fds[1], self._fds[0]))

    def set(self, a_to_b: bool, delay_s: float, loss: float) -> None:
        d = self.directions[0 if a_to_b else 1]
        d.delay_s, d.loss = delay_s, loss

    def close(self) -> None:
        for d in self.directions:
            d.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

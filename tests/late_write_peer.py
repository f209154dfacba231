"""One side of tests/test_late_write.py, run inside a host's network namespace: `python -m tests.late_write_peer
consumer|producer DIR NBYTES`. The two sides and the test talk through files in DIR (they sit in different
namespaces, so no socket of the test's reaches both).

- consumer: registers NBYTES of zeros, writes its NIXL metadata and address, then drives NIXL progress every
  10 ms until DIR/stop, recording to DIR/events the times (its monotonic clock) at which the buffer's
  nonzero count changed, at which it zeroed the buffer (told by DIR/zero: a slot handed to someone else;
  with DIR/forget, it first removes the producer's NIXL agent, as a consumer forgetting it would: "forgotten")
  and at which a LeaseFence arrived (also DIR/fenced); DIR/late once a byte landed after the zeroing;
- producer: loads the consumer, posts one WRITE of NBYTES of 0xAB with a chunk notice, releases the write's
  handle when told (DIR/release, as the producer gives up on a stuck write), then posts a LeaseFence as
  transfer/fence_writes.py does (the notification of a 1-byte write after the consumer's watched bytes) and
  keeps driving NIXL progress until DIR/stop.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from transfer.nixl_agent import NixlAgent, zeroed_buffer
from transfer.notice import FENCE_BYTES, LeaseFence, NoticeError, decode_notification


def _is_fence(raw: bytes) -> bool:
    try:
        return isinstance(decode_notification(raw), LeaseFence)
    except NoticeError:  # the write's own notice, had it completed
        return False


def _wait(path: Path) -> None:
    while not path.exists():
        time.sleep(0.01)


def consumer(d: Path, nbytes: int) -> None:
    agent = NixlAgent("late-consumer")
    region = agent.register(zeroed_buffer(nbytes + FENCE_BYTES, "cpu"))  # fences land after the watched bytes
    buf = region.tensor[:nbytes]
    (d / "meta.part").write_bytes(agent.metadata())
    (d / "addr").write_text(str(region.addr))
    (d / "meta.part").rename(d / "meta")
    _wait(d / "producer-meta")
    producer = agent.add_remote((d / "producer-meta").read_bytes())
    events, last = [], 0
    with open(d / "events.part", "w") as out:
        while not (d / "stop").exists():
            if (d / "zero").exists() and not any(e[0] == "zeroed" for e in events):
                if (d / "forget").exists():
                    agent.remove_remote(producer)
                    events.append(("forgotten", time.monotonic(), 0))
                buf.zero_()
                events.append(("zeroed", time.monotonic(), 0))
                last = 0
            got = agent.notifications()  # lands what came since the last look: bytes, then notifications
            nonzero = int(buf.count_nonzero())
            if nonzero != last:  # recorded before this look's fence: they came with it or before it
                events.append(("bytes", time.monotonic(), nonzero))
                last = nonzero
                if any(e[0] == "zeroed" for e in events):
                    (d / "late").touch()
            if any(_is_fence(raw) for msgs in got.values() for raw in msgs):
                events.append(("fence", time.monotonic(), 0))
                (d / "fenced").touch()
            time.sleep(0.01)
        json.dump(events, out)
    (d / "events.part").rename(d / "events")


def producer(d: Path, nbytes: int) -> None:
    agent = NixlAgent("late-producer")
    region = agent.register(torch.full((nbytes,), 0xAB, dtype=torch.uint8))
    (d / "producer-meta.part").write_bytes(agent.metadata())
    (d / "producer-meta.part").rename(d / "producer-meta")
    _wait(d / "meta")
    remote = agent.add_remote((d / "meta").read_bytes())
    addr = int((d / "addr").read_text())
    handle = agent.write(region, [(0, addr, nbytes)], remote, "DRAM", 0, b"chunk notice")
    (d / "posted").touch()
    while not (d / "release").exists():
        agent.poll(handle)  # drives UCX, as the push thread does while a write is on its way
        time.sleep(0.01)
    agent.release(handle)  # what the producer does with a write stuck past its lease's deadline
    fence = LeaseFence(transfer_id="t", epoch=1, incarnation="late-producer").encode()
    fenced = agent.write(region, [(0, addr + nbytes, 1)], remote, "DRAM", 0, fence)  # as fence_writes.py posts it
    while not (d / "stop").exists():
        agent.poll(fenced)  # UCX moves only when driven (the producer's push thread does this)
        time.sleep(0.01)


if __name__ == "__main__":
    {"consumer": consumer, "producer": producer}[sys.argv[1]](Path(sys.argv[2]), int(sys.argv[3]))

"""A consumer endpoint in its own process, driven over a multiprocessing pipe by tests."""
from __future__ import annotations

import multiprocessing as mp
import time
import zlib

from launch.polling import wait_for
from transfer.consumer_endpoint import ConsumerEndpoint
from transfer.consumer_settings import ConsumerSettings
from transfer.device_fence import COMPLETED
from transfer.layout import KVLayout


def _read_stream(ep: ConsumerEndpoint, key: str, timeout_s: float) -> tuple[list[int], str, int]:
    """Play the decode worker for a windowed transfer: take chunks as they land, verify and "scatter" them
    (crc of the bytes read), free their slots, finish once every chunk is read. Returns (crc per chunk read,
    why it stopped early or '', most chunks the lease held at once)."""
    crcs, most, deadline = [], 0, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lease, chunks, why = ep.book.take_window(key, "reader")
        if not why and ep.book.status(key)[0].value == "ENDED":
            why = ep.book.status(key)[1]
        if why:
            ep.book.finish(key, None, {"state": "FAILED", "reason": why})
            return crcs, why, most
        if not chunks:
            ep.wait_arrivals(0.01)
            continue
        most = max(most, lease.taken - lease.freed)
        bad = ep.verify(lease, chunks)
        crcs += [zlib.crc32(v.numpy()) for v in ep.chunk_views(lease, chunks)]
        ep.book.window_done(key, lease, chunks[-1] + 1, COMPLETED)
        if bad:
            ep.book.finish(key, None, {"state": "FAILED", "reason": f"bad chunks {bad}"})
            return crcs, f"bad chunks {bad}", most
        if lease.taken == len(lease.chunk_nbytes):
            ep.book.finish(key, None, {"state": "SCATTERED"})
            return crcs, "", most
    return crcs, "timed out", most


def _serve(conn, layout_json: str, kwargs: dict) -> None:
    ep = ConsumerEndpoint(KVLayout.model_validate_json(layout_json), ConsumerSettings(**kwargs))
    conn.send((ep.address, ep.incarnation))
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            ep.close()
            conn.send(None)
            return
        if cmd == "stats":
            conn.send(ep.pool.stats())
        elif cmd == "lease":
            lease = ep.pool.live(arg)
            if lease is None:
                conn.send(None)
            else:
                conn.send({"complete": lease.complete, "epoch": lease.epoch, "slots": lease.slots,
                           "arrived": sorted(lease.arrived),
                           "kv_ready_at": [lease.arrived[c].kv_ready_at for c in sorted(lease.arrived)],
                           "crcs": [zlib.crc32(v.numpy()) for v in ep.chunk_views(lease)],
                           "bad": ep.verify(lease)})
        elif cmd == "release":
            conn.send(ep.pool.release(arg))
        elif cmd == "expect":  # (key, num_tokens, token_hash): a decode request now waits for this transfer
            conn.send(ep.book.expect(*arg))
        elif cmd == "counters":
            conn.send(ep.book.snapshot())
        elif cmd == "status":
            conn.send(tuple(ep.book.status(arg)))
        elif cmd == "last_sign":  # when (monotonic clock) the producer of `arg` last showed life without chunks
            conn.send(ep.book.last_sign(arg))
        elif cmd == "read_stream":  # (key, num_tokens, token_hash, timeout_s): expect it, then read it as it lands
            ep.book.expect(*arg[:3])
            conn.send(_read_stream(ep, arg[0], arg[3]))


class ConsumerProcess:
    def __init__(self, layout: KVLayout, **kwargs) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, layout.model_dump_json(), kwargs), daemon=True)
        self.proc.start()
        if not self._conn.poll(60):
            self.proc.kill()
            raise TimeoutError("consumer endpoint process did not start within 60s")
        self.address, self.incarnation = self._conn.recv()

    def call(self, cmd: str, arg=None):
        self.send(cmd, arg)
        return self.recv()

    def send(self, cmd: str, arg=None) -> None:
        """Start a command whose answer comes later (`recv`), e.g. a reader that runs while the test pushes."""
        self._conn.send((cmd, arg))

    def recv(self, timeout_s: float = 60):
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"consumer process gave no answer within {timeout_s}s")
        return self._conn.recv()

    def wait_pool_full(self, timeout_s: float = 10) -> None:
        """Every slot free again: what each test must leave behind (nothing leased, nothing quarantined). A lease
        ended early rests until its quarantine past its deadline, up to a 5 s lease's ttl."""
        wait_for(lambda: (s := self.call("stats")).free == s.total, timeout_s, 0.01, "consumer pool back to full")

    def ended_reason(self, key: str, timeout_s: float = 5) -> str:
        """Why transfer `key` ended here, once its consumer-side state is ENDED."""
        _, reason = wait_for(lambda: (st := self.call("status", key))[0] == "ENDED" and st, timeout_s, 0.01,
                             f"{key} ended")
        return reason

    def stop(self) -> None:
        if self.proc.is_alive():
            self.call("stop")
            self.proc.join(10)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(10)

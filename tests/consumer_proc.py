"""A consumer endpoint in its own process, driven over a multiprocessing pipe by tests."""
from __future__ import annotations

import multiprocessing as mp
import zlib

from transfer.consumer_endpoint import ConsumerEndpoint, ConsumerSettings
from transfer.layout import KVLayout


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
        self._conn.send((cmd, arg))
        return self._conn.recv()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.call("stop")
            self.proc.join(10)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(10)

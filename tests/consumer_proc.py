"""A consumer endpoint in its own process, driven over a multiprocessing pipe by tests."""
from __future__ import annotations

import multiprocessing as mp
import zlib

from transfer.consumer_endpoint import ConsumerEndpoint
from transfer.layout import KVLayout


def _serve(conn, layout_json: str, kwargs: dict) -> None:
    ep = ConsumerEndpoint(KVLayout.model_validate_json(layout_json), **kwargs)
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
                           "crcs": [zlib.crc32(ep.slot_view(s).numpy()) for s in lease.slots],
                           "bad": ep.verify(lease)})
        elif cmd == "release":
            conn.send(ep.pool.release(arg))


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

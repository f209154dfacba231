"""How the scheduler asks the worker's store which prompt chunks it holds.

vLLM runs the scheduler (EngineCore) and the worker in different processes, and the store with
its memory tier lives in the worker. The worker answers lookups on a ZMQ REP socket on
127.0.0.1 and hands the address, with the chunk-key seed, to the scheduler through vLLM's
connector handshake-metadata hook (collected after KV caches are registered). A lookup that
does not answer within `timeout_s` counts as "nothing held": the request is computed, not held up.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import zmq
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
)

from transfer import wire
from pd.prefix_store import PrefixStore
from storage.chunk_keys import chunk_keys
from transfer.threads import start_io_thread

log = logging.getLogger("kvbridge.store")


@dataclass
class StoreHandshake(KVConnectorHandshakeMetadata):
    lookup_address: str
    seed: bytes
    chunk_tokens: int


class LookupServer:
    """Worker side: a thread answering StoreLookup with StoreHeld."""

    def __init__(self, store: PrefixStore, host: str = "127.0.0.1") -> None:
        self.store = store
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._stop = threading.Event()
        self._thread = start_io_thread(self._serve, "kvbridge-store-lookup")

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(200):
                continue
            raw = self._sock.recv()
            try:
                req = wire.decode_lookup(raw)
                reply = wire.StoreHeld(rid=req.rid, held=self.store.lookup(req.keys))
            except wire.WireError as e:
                reply = wire.Error(code=e.code, message=str(e))
            self._sock.send(wire.encode(reply))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


class LookupClient:
    """Scheduler side: keys from the worker's seed, one round trip per lookup, bounded wait."""

    def __init__(self, hs: StoreHandshake, timeout_s: float) -> None:
        self.address, self.seed, self.chunk_tokens = hs.lookup_address, hs.seed, hs.chunk_tokens
        self.timeout_ms = int(timeout_s * 1000)
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._rid = 0

    def keys(self, token_ids: list[int]) -> list[str]:
        return chunk_keys(token_ids, self.chunk_tokens, self.seed)

    def held(self, keys: list[str]) -> int:
        if not keys:
            return 0
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.address)
        self._rid += 1
        self._sock.send(wire.encode(wire.StoreLookup(rid=self._rid, keys=keys)))
        if self._sock.poll(self.timeout_ms):
            try:
                reply = wire.decode_held(self._sock.recv())
                if reply.rid == self._rid:
                    return reply.held
            except wire.WireError as e:
                log.warning("store lookup: bad reply from %s: %s", self.address, e)
                return 0
        log.warning("store lookup at %s did not answer in %d ms; computing the prompt", self.address,
                    self.timeout_ms)
        self._sock.close()  # a REQ socket waiting for a reply cannot send again
        self._sock = None
        return 0

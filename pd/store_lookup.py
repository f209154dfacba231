"""How the scheduler asks the worker's store which prompt chunks it holds.

vLLM runs the scheduler (EngineCore) and the worker in different processes, and the store with
its memory tier lives in the worker. The worker answers lookups on a ZMQ REP socket on
127.0.0.1 and hands the address, with the chunk-key seed, to the scheduler through vLLM's
connector handshake-metadata hook (collected after KV caches are registered).

The scheduler never waits long for its worker: a lookup is sent, and its answer collected when it
comes, each call waiting a few milliseconds at most (`ask` / `answer`). Meanwhile vLLM is told to ask
again next step, so other requests are scheduled; a request whose answer has not come `timeout_s` after
the question is computed, not held up further. (A lookup that blocked the scheduler for up to `timeout_s`
and then counted as "nothing held" for good made the whole suite's store test compute a stored prefix
whenever its worker was slow for a moment.)
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import zmq
from prometheus_client import Histogram
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
)

from transfer import wire
from pd.prefix_store import PrefixStore
from storage.chunk_keys import chunk_keys
from transfer.threads import io_context, start_io_thread

log = logging.getLogger("kvbridge.store")
LOOKUP_SECONDS = Histogram("kvbridge_store_lookup_seconds", "Store lookups: from question to the scheduler reading "
                           "the worker's answer, on the first engine step after it came (asked), or to giving up "
                           "(timed_out); scheduler time for an answer kept from this request's earlier lookup "
                           "(cached)", ["answer"],
                           buckets=(1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5))


@dataclass
class StoreHandshake(KVConnectorHandshakeMetadata):
    lookup_address: str
    seed: bytes
    chunk_tokens: int


class LookupServer:
    """Worker side: a thread answering StoreLookup with StoreHeld."""

    def __init__(self, store: PrefixStore, host: str = "127.0.0.1") -> None:
        self.store = store
        self._sock = io_context().socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._stop = threading.Event()
        self._thread = start_io_thread(self._serve, "kvbridge-lookup")

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
    """Scheduler side: keys from the worker's seed; lookups in flight side by side, answers matched by id."""

    def __init__(self, hs: StoreHandshake, timeout_s: float) -> None:
        self.address, self.seed, self.chunk_tokens = hs.lookup_address, hs.seed, hs.chunk_tokens
        self.timeout_s = timeout_s
        self._sock = io_context().socket(zmq.DEALER)  # the worker's REP answers in order
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.address)
        self._ids = itertools.count(1)
        self._asked: dict[int, int | None] = {}  # lookup id -> chunks held (None: no answer yet)

    def keys(self, token_ids: list[int]) -> list[str]:
        return chunk_keys(token_ids, self.chunk_tokens, self.seed)

    def ask(self, keys: list[str]) -> int:
        """Send a lookup; returns its id for `answer`."""
        lookup = next(self._ids)
        self._asked[lookup] = None
        self._sock.send_multipart([b"", wire.encode(wire.StoreLookup(rid=lookup, keys=keys))])
        return lookup

    def answer(self, lookup: int, wait_s: float) -> int | None:
        """How many leading chunks the worker holds, once it answered (the id is then forgotten); None
        while it has not, after waiting at most `wait_s` for it."""
        end = time.monotonic() + wait_s
        while self._asked.get(lookup) is None and self._sock.poll(max(0, int((end - time.monotonic()) * 1000))):
            try:
                reply = wire.decode_held(self._sock.recv_multipart()[-1])
            except wire.WireError as e:
                log.warning("store lookup: bad reply from %s: %s", self.address, e)
                continue
            if reply.rid in self._asked:  # one given up on (`forget`) is dropped
                self._asked[reply.rid] = reply.held
        held = self._asked.get(lookup)
        if held is not None:
            del self._asked[lookup]
        return held

    def forget(self, lookup: int) -> None:
        """The scheduler stopped waiting for this lookup: its answer, if it ever comes, is dropped."""
        self._asked.pop(lookup, None)

    def held(self, keys: list[str]) -> int:
        """One lookup waited for up to `timeout_s` (0 when it did not answer): for tools and tests."""
        lookup = self.ask(keys)
        held = self.answer(lookup, self.timeout_s)
        self.forget(lookup)
        return held or 0


@dataclass
class _Asked:
    keys: list[str]
    at: float
    ids: list[int]  # one lookup per worker
    held: list[int | None] = field(default_factory=list)  # each worker's answer so far


class StoreLookups:
    """The scheduler's lookups to every worker with a store (one per TP rank). A request's answer is the
    leading chunks every rank holds, once all answered, or nothing `timeout_s` after the question."""

    def __init__(self, clients: list[LookupClient], timeout_s: float, poll_s: float = 0.005) -> None:
        self.clients, self.timeout_s, self.poll_s = clients, timeout_s, poll_s
        self.chunk_tokens = clients[0].chunk_tokens
        self._asked: dict[str, _Asked] = {}

    def keys(self, token_ids: list[int]) -> list[str]:
        return self.clients[0].keys(token_ids)

    def answer(self, rid: str, token_ids: list[int]) -> tuple[list[str], int, str, float] | None:
        """(keys, chunks held, "asked" or "timed_out", seconds since the question); None while waiting. The
        first call asks. Only the oldest lookup waits (at most `poll_s` per worker): workers answer in order,
        so one scheduler pass over many waiting requests waits once, not once per request."""
        a = self._asked.get(rid)
        if a is None:
            keys = self.keys(token_ids)
            ids = [c.ask(keys) for c in self.clients] if keys else []
            a = self._asked[rid] = _Asked(keys, time.monotonic(), ids, [None] * len(ids))
        wait = self.poll_s if next(iter(self._asked)) == rid else 0.0
        a.held = [h if h is not None else c.answer(i, wait) for c, i, h in zip(self.clients, a.ids, a.held)]
        waited = time.monotonic() - a.at
        if None not in a.held:
            outcome = "asked"
        elif waited < self.timeout_s:
            return None
        else:
            log.warning("request %s: the store lookup did not answer in %.2f s; computing its prompt", rid, waited)
            outcome = "timed_out"
        self.forget(rid)
        return a.keys, min((h or 0 for h in a.held), default=0), outcome, waited

    def forget(self, rid: str) -> None:
        """The request is answered or gone: a lookup still unanswered is dropped with it."""
        a = self._asked.pop(rid, None)
        if a is not None:
            for c, i in zip(self.clients, a.ids):
                c.forget(i)

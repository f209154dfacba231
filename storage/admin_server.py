"""The store's admin listener: `kvbridge store stats | clear` reach a prefill worker's store here.

Why its own listener: the store lives in the prefill worker, which has no control channel of its own
(it dials the decode nodes' endpoints), vLLM's HTTP server cannot reach the worker process, and the
metrics port is prometheus_client's read-only server. So the worker listens on `store.admin_port` (plus
its TP rank) at the connector's `listen_host`, and takes only authenticated control frames
(transfer/control_auth.py) signed as sender `admin` with the deployment secret; without a secret it
accepts unsigned frames and, like the consumer endpoint, refuses to listen on a routable address
unless `insecure: true`. One request at a time on its own thread: a clear never runs on the engine thread.
"""
from __future__ import annotations

import logging
import threading

import zmq

from storage.admin_messages import ADMIN_SENDER, AdminError, StoreReport, TierReport, decode_request, encode
from storage.tiered_store import TieredStore
from transfer.control_auth import AuthError, Authenticator
from transfer.credentials import ADMIN_RISK, require_secret
from transfer.threads import io_context, start_io_thread

log = logging.getLogger("kvbridge.store")


class StoreAdminServer:
    def __init__(self, store: TieredStore, host: str, port: int, secret: bytes | None, insecure: bool = False) -> None:
        warning = require_secret(host, secret, insecure, "the store admin listener", ADMIN_RISK)
        if warning:
            log.warning(warning)
        self.store = store
        self.auth = Authenticator(secret)
        self._sock = io_context().socket(zmq.ROUTER)  # its I/O thread not pinned to the compute core
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 1 << 16)
        if port:
            self._sock.bind(f"tcp://{host}:{port}")
        else:
            port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"{host}:{port}"
        self._stop = threading.Event()
        self._thread = start_io_thread(self._serve, "kvbridge-store-admin")
        log.info("store admin listens on %s", self.address)

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(200):
                continue
            frames = self._sock.recv_multipart()
            try:
                reply = self._handle(frames[-1] if len(frames) > 1 else b"")
            except Exception as e:  # a tier bug must not end the listener: say so to the asker
                log.exception("store admin request failed")
                reply = self.auth.seal_reply(None, encode(StoreReport(ok=False, error=f"{type(e).__name__}: {e}")))
            self._sock.send_multipart([frames[0], reply])

    def _handle(self, payload: bytes) -> bytes:
        try:
            opened = self.auth.open(payload)
        except AuthError as e:
            log.warning("store admin: refused a frame (%s)", e)
            return self.auth.seal_reply(None, encode(StoreReport(ok=False, error="refused")))
        if self.auth.required and opened.sender != ADMIN_SENDER:
            log.warning("store admin: refused a frame from %r (only %r may ask)", opened.sender[:64], ADMIN_SENDER)
            return self.auth.seal_reply(opened, encode(StoreReport(ok=False, error="refused")))
        try:
            req = decode_request(opened.body)
        except AdminError as e:
            return self.auth.seal_reply(opened, encode(StoreReport(ok=False, error=str(e))))
        removed = self.store.clear() if req.op == "clear" else {}
        if removed:
            log.warning("store cleared by %s: %s chunks removed", opened.sender[:64],
                        ", ".join(f"{k} {v}" for k, v in removed.items()))
        tiers = {name: TierReport(**r, removed=removed.get(name, 0)) for name, r in self.store.report().items()}
        return self.auth.seal_reply(opened, encode(StoreReport(tiers=tiers)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close(0)

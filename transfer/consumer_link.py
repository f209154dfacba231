"""Producer's control connection to one consumer endpoint (ZMQ DEALER).

Handshakes on first use, and again whenever the consumer says it does not know us:
that is how a restarted consumer (new incarnation) is noticed; the stale NIXL remote
agent is dropped and the new one added, with no restart on this side.
"""
from __future__ import annotations

import itertools
import logging
import threading

import zmq

from transfer import wire
from transfer.control_auth import AuthError, Credential
from transfer.identity import TransferSpec
from transfer.nixl_agent import NixlAgent

log = logging.getLogger("kvbridge.producer")


class HandshakeRejected(RuntimeError):
    """The consumer's layout differs; `reasons` names each differing field."""

    def __init__(self, address: str, reasons: list[str]) -> None:
        super().__init__(f"consumer {address} rejected the handshake: " + "; ".join(reasons))
        self.reasons = reasons


class PeerUnreachable(RuntimeError):
    """No reply within the timeout: the consumer is down or unreachable."""


class PeerError(RuntimeError):
    """The consumer answered with an error reply."""

    def __init__(self, address: str, code: str, message: str) -> None:
        super().__init__(f"consumer {address}: {code}: {message}")
        self.code = code


class ConsumerLink:
    def __init__(self, address: str, agent: NixlAgent, hello: wire.Hello, secret: bytes | None = None,
                 timeout_s: float = 2.0) -> None:
        """`hello` is this producer's introduction (id, generation, layout, chunk geometry, agent); every
        message is signed with the key of `producer/<its id>` derived from `secret` (control_auth.py)."""
        self.address = address
        self._agent = agent
        self._hello_msg = hello
        self._incarnation = hello.incarnation
        self._cred = Credential(f"producer/{hello.producer_id}", secret)
        self._timeout_ms = int(timeout_s * 1000)
        self._rid = itertools.count(1)
        self._lock = threading.Lock()
        self._sock: zmq.Socket | None = None
        self.welcome: wire.Welcome | None = None

    def ensure(self) -> wire.Welcome:
        if self.welcome is None:
            self._hello()
        return self.welcome

    def alloc(self, spec: TransferSpec, ttl_s: float) -> wire.Grant | wire.NoCapacity:
        self.ensure()
        msg = wire.Alloc(incarnation=self._incarnation, transfer_id=spec.key, attempt=spec.attempt,
                         num_tokens=spec.num_tokens, token_hash=spec.token_hash,
                         weights_fingerprint=self._hello_msg.layout.weights_fingerprint, ttl_s=ttl_s)
        try:
            return self._call(msg, (wire.Grant, wire.NoCapacity))
        except PeerError as e:
            if e.code != "handshake_required":
                raise
            log.info("consumer %s does not know us (restarted?): handshaking again", self.address)
            self._hello()
            return self._call(msg, (wire.Grant, wire.NoCapacity))

    def renew(self, transfer_id: str, epoch: int, ttl_s: float) -> bool:
        return self._call(wire.Renew(transfer_id=transfer_id, epoch=epoch, ttl_s=ttl_s), (wire.Ack,)).ok

    def release(self, transfer_id: str, epoch: int, reason: str = "") -> bool:
        """End our lease (epoch 0: we never got one); a `reason` tells the consumer we gave up."""
        return self._call(wire.Release(transfer_id=transfer_id, epoch=epoch, reason=reason[:1024]), (wire.Ack,)).ok

    def close(self) -> None:
        with self._lock:
            self._reset_socket()
        if self.welcome is not None:
            self._agent.remove_remote(self.welcome.agent_name)
            self.welcome = None

    def _hello(self) -> None:
        reply = self._call(self._hello_msg.model_copy(), (wire.Welcome, wire.Reject))
        if isinstance(reply, wire.Reject):
            raise HandshakeRejected(self.address, reply.reasons)
        old = self.welcome
        if old is not None and old.incarnation != reply.incarnation:
            log.info("consumer %s restarted (incarnation %s -> %s): dropping stale agent",
                     self.address, old.incarnation[:12], reply.incarnation[:12])
        if old is not None:
            self._agent.remove_remote(old.agent_name)
        self._agent.add_remote(reply.agent_meta)
        self.welcome = reply

    def _call(self, msg: wire._Msg, expect: tuple[type, ...]):
        with self._lock:
            msg.rid = next(self._rid)
            if self._sock is None:
                self._sock = zmq.Context.instance().socket(zmq.DEALER)
                self._sock.setsockopt(zmq.LINGER, 0)
                self._sock.connect(f"tcp://{self.address}")
            frame, nonce = self._cred.seal(wire.encode(msg))
            self._sock.send(frame)
            while True:
                if not self._sock.poll(self._timeout_ms):
                    self._reset_socket()
                    raise PeerUnreachable(f"consumer {self.address} did not answer {msg.type} "
                                          f"within {self._timeout_ms} ms")
                try:
                    reply = wire.decode_reply(self._cred.open_reply(self._sock.recv(), nonce))
                except AuthError as e:
                    if e.code == "stale":
                        continue  # the late answer to a request we gave up on
                    raise PeerError(self.address, e.code, str(e)) from None
                if reply.rid == msg.rid or (isinstance(reply, wire.Error) and reply.rid == 0):
                    break  # rid 0: the endpoint could not read our frame, so it could not echo the rid
        if isinstance(reply, wire.Error) and reply.code == "unauthenticated":
            raise PeerError(self.address, reply.code, "the consumer refused our frame without reading it: it "
                            "requires a deployment secret this producer lacks or has wrong, or our clock is off")
        if isinstance(reply, wire.Error):
            raise PeerError(self.address, reply.code, reply.message)
        if not isinstance(reply, expect):
            raise PeerError(self.address, "unexpected", f"{reply.type} in answer to {msg.type}")
        return reply

    def _reset_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

"""Producer's control connection to one consumer endpoint (ZMQ DEALER).

Handshakes on first use, and again whenever the consumer says it does not know us:
that is how a restarted consumer (new incarnation) is noticed; the stale NIXL remote
agent is dropped and the new one added, with no restart on this side.

A consumer that dies closes its TCP connection (or refuses a new one). The socket's monitor
sees that, so a call waiting on a dead consumer ends at once and later calls fail fast
instead of each waiting out the RPC timeout in turn (a link's calls run one after another); ZMQ keeps
reconnecting, and a consumer restarted on the same address is used again as soon as the
connection is back. A consumer that keeps its connection but stops answering (frozen, swapping)
costs one timeout: calls in the next timeout's span fail at once, then one probes again.

The monitor must be read: ZMQ's I/O thread writes each event into it and blocks once ~1000 are
unread, and with it every socket of the process's context (an unreachable consumer, retried every
50 ms, wedged the prefill's whole control plane within a minute). So the owner calls `tend()` about
twice a second: it reads the events, and closes the socket of a link left idle for `idle_close_s`
(the next call opens a new one). Retries do not back off: a restarted consumer is used again within
RECONNECT_IVL_MS of being back.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from transfer import wire
from transfer.control_auth import AuthError, Credential
from transfer.identity import TransferSpec
from transfer.nixl_agent import NixlAgent
from transfer.threads import io_context
from transfer.withdrawals import UnansweredAllocs, Unreachable

log = logging.getLogger("kvbridge.producer")
_LOST = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED  # the peer closed on us, or nobody listens there
_BACK = zmq.EVENT_CONNECTED
RECONNECT_IVL_MS = 50  # how often ZMQ retries a lost connection
RECONNECT_GRACE_S = 0.2  # a call to a lost consumer waits this long for it to be back, then fails
# error codes a consumer answers a Withdraw with that another try would get again (withdrawals.py drops it)
FINAL_REFUSALS = frozenset({"forbidden", "invalid", "malformed", "version", "too_large"})
# numbers every ALLOC of this process: no two of a producer's ALLOCs share an id, even on two links that
# reach the same consumer by different addresses (a Withdraw names one)
_alloc_ids = itertools.count(1)


class HandshakeRejected(RuntimeError):
    """The consumer's layout differs; `reasons` names each differing field."""

    def __init__(self, address: str, reasons: list[str]) -> None:
        super().__init__(f"consumer {address} rejected the handshake: " + "; ".join(reasons))
        self.reasons = reasons


class PeerUnreachable(RuntimeError):
    """No reply within the timeout: the consumer is down or unreachable. `sent`: the request went out (it may
    still arrive, however late); False when the call failed before sending it."""

    def __init__(self, message: str, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


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
        self.unanswered = UnansweredAllocs()  # sent ALLOCs we gave up on, to withdraw (withdrawals.py)
        self._lock = threading.Lock()
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._lost_since: float | None = None  # when the connection was lost and not back since
        self._quiet_until = 0.0  # a call timed out: calls fail at once until then
        self._last_call = time.monotonic()
        self.welcome: wire.Welcome | None = None

    def ensure(self) -> wire.Welcome:
        if self.welcome is None:
            self._hello()
        return self.welcome

    def alloc(self, spec: TransferSpec, ttl_s: float) -> wire.Grant | wire.NoCapacity:
        self.ensure()
        msg = wire.Alloc(incarnation=self._incarnation, transfer_id=spec.key, attempt=spec.attempt,
                         num_tokens=spec.num_tokens, token_hash=spec.token_hash,
                         weights_fingerprint=self._hello_msg.layout.weights_fingerprint, ttl_s=ttl_s,
                         alloc_id=next(_alloc_ids))
        try:
            return self._alloc_call(msg)
        except PeerError as e:
            if e.code != "handshake_required":
                raise
            log.info("consumer %s does not know us (restarted?): handshaking again", self.address)
            self._hello()
            return self._alloc_call(msg)

    def _alloc_call(self, msg: wire.Alloc) -> wire.Grant | wire.NoCapacity:
        try:
            return self._call(msg, (wire.Grant, wire.NoCapacity))
        except PeerUnreachable as e:
            if e.sent:  # it may still arrive: its lease would hold slots for nobody
                self.unanswered.add(msg.transfer_id, msg.alloc_id)
            raise

    def withdraw(self, transfer_id: str, alloc_id: int) -> None:
        """Tell the consumer our unanswered ALLOC `alloc_id` holds nothing (withdrawals.py). Unreachable when
        it cannot be reached now, or answers with an error that may pass (a PeerError that will not: dropped)."""
        try:
            self._call(wire.Withdraw(incarnation=self._incarnation, transfer_id=transfer_id, alloc_id=alloc_id),
                       (wire.Ack,), touch=False)
        except PeerUnreachable as e:
            raise Unreachable(str(e)) from None
        except PeerError as e:
            if e.code not in FINAL_REFUSALS:
                raise Unreachable(str(e)) from None
            raise

    def renew(self, transfer_id: str, epoch: int, ttl_s: float) -> bool:
        return self._call(wire.Renew(transfer_id=transfer_id, epoch=epoch, ttl_s=ttl_s), (wire.Ack,)).ok

    def progress(self, transfer_id: str, epoch: int, ttl_s: float) -> wire.WindowState:
        """How far a windowed lease may be written now; renews it."""
        return self._call(wire.Progress(transfer_id=transfer_id, epoch=epoch, ttl_s=ttl_s), (wire.WindowState,))

    def pending(self, transfer_id: str) -> bool:
        """Tell the consumer this transfer's request waits in our queue (needs no handshake)."""
        return self._call(wire.Pending(transfer_id=transfer_id), (wire.Ack,)).ok

    def release(self, transfer_id: str, epoch: int, reason: str = "", writes_done: bool = True) -> bool:
        """End our lease (epoch 0: we never got one); a `reason` tells the consumer we gave up (wire.Release)."""
        msg = wire.Release(transfer_id=transfer_id, epoch=epoch, reason=reason[:1024], writes_done=writes_done)
        return self._call(msg, (wire.Ack,)).ok

    @property
    def gone(self) -> bool:
        """The consumer closed its connection (or refuses one) and has not come back: a lease held
        there is lost with it, without asking. (One that only left a call unanswered is not gone:
        transfers that need no call go on, the others fail at their next call, at once.) Never waits:
        while a call to it is under way (it learns the same and fails), the last state seen."""
        if not self._lock.acquire(blocking=False):
            return self._lost_since is not None
        try:
            self._read_monitor()
            return self._lost_since is not None
        finally:
            self._lock.release()

    def tend(self, idle_close_s: float = 30.0) -> None:
        """Read the connection events that arrived (see the module docstring), and close the socket of a
        link no call used for `idle_close_s`. Never waits: a call under way reads them itself."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._sock is not None and time.monotonic() - self._last_call > idle_close_s:
                self._reset_socket()
            else:
                self._read_monitor()
        finally:
            self._lock.release()

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

    def _call(self, msg: wire._Msg, expect: tuple[type, ...], touch: bool = True):
        """`touch` False: this call does not keep an idle link's socket open (tend)."""
        with self._lock:
            msg.rid = next(self._rid)
            if touch:
                self._last_call = time.monotonic()
            if time.monotonic() < self._quiet_until:
                raise PeerUnreachable(f"consumer {self.address} left a call unanswered for {self._timeout_ms} ms "
                                      f"moments ago (not sent: {msg.type})", sent=False)
            self._open()
            self._read_monitor()
            if self._lost_since is not None and not self._wait_back():
                raise PeerUnreachable(f"consumer {self.address} closed its connection "
                                      f"{time.monotonic() - self._lost_since:.1f} s ago and is not back "
                                      f"after {RECONNECT_GRACE_S} s (not sent: {msg.type})", sent=False)
            frame, nonce = self._cred.seal(wire.encode(msg))
            self._sock.send(frame)
            poller = zmq.Poller()
            poller.register(self._sock, zmq.POLLIN)
            poller.register(self._monitor, zmq.POLLIN)
            deadline = time.monotonic() + self._timeout_ms / 1000
            while True:
                ready = dict(poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
                if not ready:
                    self._reset_socket()
                    self._quiet_until = time.monotonic() + self._timeout_ms / 1000
                    raise PeerUnreachable(f"consumer {self.address} did not answer {msg.type} "
                                          f"within {self._timeout_ms} ms")
                if self._monitor in ready:
                    self._read_monitor()
                    if self._lost_since is not None:
                        raise PeerUnreachable(f"consumer {self.address} closed its connection while "
                                              f"we waited for the answer to {msg.type}")
                if self._sock not in ready:
                    continue
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

    def _open(self) -> None:
        if self._sock is None:
            self._sock = io_context().socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
            self._monitor = self._sock.get_monitor_socket(_LOST | _BACK)
            self._sock.connect(f"tcp://{self.address}")

    def _read_monitor(self) -> None:
        """Apply the connection events that arrived, in order; the last one says where we stand."""
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event & _BACK:
                if self._lost_since is not None:
                    log.info("consumer %s: connection back", self.address)
                self._lost_since = None
            elif self._lost_since is None:
                self._lost_since = time.monotonic()
                log.info("consumer %s: connection lost (%s)", self.address, zmq.Event(event).name)

    def _wait_back(self) -> bool:
        """Give a consumer that may have just restarted the time ZMQ needs to reconnect (a few retries),
        no more: a dead one costs the push thread this grace, not a whole RPC timeout."""
        end = time.monotonic() + RECONNECT_GRACE_S
        while self._lost_since is not None and self._monitor.poll(max(0, int((end - time.monotonic()) * 1000))):
            self._read_monitor()
        return self._lost_since is None

    def _reset_socket(self) -> None:
        if self._sock is not None:
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._sock.close(0)
            self._sock = self._monitor = None
            self._lost_since = None

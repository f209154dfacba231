"""Consumer endpoint: the handshake/lease service and the NIXL notification pump, one thread.

It owns the slot region (registered once at start), the slot pool, the receive book the
engine reads (`book`) and the NIXL agent that producers write into. One thread serves both
the ZMQ ROUTER socket and NIXL notifications, looking as often as `poll_pace.py` says (never without a
pause: it shares the decode worker's interpreter and core with the engine thread).

Every frame is opened by `control_auth.Authenticator` first. With a secret, a frame that is not
authentic and fresh gets one generic refusal and nothing else (no layout, no reason); an authentic
one is then checked against what its sender may do (`sender_rules.py`): producers handshake only under
their own id and touch only their own leases, only the router cancels and reads traces.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
import zlib

import torch
import zmq

from transfer import poll_pace, wire
from transfer.control_auth import AuthError, Authenticator, Opened
from transfer.credentials import is_loopback, require_secret
from transfer.config_errors import ConfigError
from transfer.consumer_settings import ConsumerSettings
from transfer.geometry import ChunkGeometry
from transfer.layout import KVLayout
from transfer.lease_desk import LeaseDesk
from transfer.nixl_agent import NixlAgent, zeroed_buffer
from transfer.notice import FENCE_BYTES
from transfer.notice_intake import NoticeIntake
from transfer.producer_registry import ProducerRegistry
from transfer.sender_rules import forbidden
from transfer.receive_book import ReceiveBook
from transfer.slot_pool import Lease, SlotPool
from transfer.threads import io_context, start_io_thread
from transfer.write_hold import held_rest, write_hold_s

log = logging.getLogger("kvbridge.consumer")
REFUSED = wire.Error(code="unauthenticated", message="refused")  # all an unauthenticated peer ever learns


class ConsumerEndpoint:
    def __init__(self, layout: KVLayout, settings: ConsumerSettings) -> None:
        self.layout = layout
        self.cfg = settings
        if warning := require_secret(settings.host, settings.secret, settings.insecure, "the consumer endpoint"):
            log.warning(warning)
        if settings.ucx_error_handling == "none" and not is_loopback(settings.host):
            log.warning("consumer endpoint on %s with UCX error handling 'none': measured between processes on one "
                        "host only; a producer on another host should use 'peer' (transfer/ucx_error_handling.py)",
                        settings.host)
        self.auth = Authenticator(settings.secret)
        self._loopback_only = is_loopback(settings.host)  # write_hold.py
        self._refused, self._refused_logged_at = 0, 0.0
        self.geometry = ChunkGeometry(layout, settings.chunk_tokens)
        self.slot_bytes = self.geometry.slot_bytes
        self.incarnation = uuid.uuid4().hex
        self.agent = NixlAgent(f"kvb-consumer-{self.incarnation[:12]}", settings.ucx_error_handling)
        self.region = self.agent.register(zeroed_buffer(settings.num_slots * self.slot_bytes + FENCE_BYTES,
                                                        settings.device))  # fences land after the slots
        self.pool = SlotPool(settings.num_slots, self.slot_bytes, settings.quarantine_s, settings.fence_timeout_s,
                             on_expire=lambda key: self.book.expired(key))
        self.book = ReceiveBook(self.pool, settings.unclaimed_ttl_s, first_contact_s=settings.handshake_grace_s)
        self.producers = ProducerRegistry(self.agent, self.pool)
        self.intake = NoticeIntake(self.pool, self.book, self.producers, settings.unclaimed_ttl_s)
        self.desk = LeaseDesk(self.pool, self.book, self.geometry, self.region.addr, settings.window_slots,
                              settings.expect_wait_s, self.incarnation)
        self._sock = io_context().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 8 * wire.MAX_MESSAGE_BYTES)
        try:
            port = settings.port or self._sock.bind_to_random_port(f"tcp://{settings.host}")
            if settings.port:
                self._sock.bind(f"tcp://{settings.host}:{settings.port}")
        except zmq.ZMQError as e:
            raise ConfigError(f"consumer endpoint of TP rank {layout.tp_rank} cannot listen on {settings.host}:"
                              f"{settings.port} ({e}); rank r listens on the connector's listen_port + r") from None
        self.address = f"{settings.host}:{port}"
        self._stop = threading.Event()
        self._arrived = threading.Condition()
        self.arrivals = 0  # batches of chunk notices pumped (grows under _arrived)
        self.awaited_until = 0.0  # until then the engine sits idle waiting for chunks (wait_arrivals)
        self._thread = start_io_thread(self._run, "kvbridge-consumer")
        log.info("consumer endpoint %s incarnation %s: %d slots x %d bytes (%d tokens)", self.address,
                 self.incarnation[:12], settings.num_slots, self.slot_bytes, settings.chunk_tokens)

    def slot_view(self, slot: int) -> torch.Tensor:
        return self.region.tensor[slot * self.slot_bytes:(slot + 1) * self.slot_bytes]

    def chunk_views(self, lease: Lease, chunks: list[int] | None = None) -> list[torch.Tensor]:
        """Each chunk's bytes in its slot (every chunk of a whole lease by default), exactly as many as it holds."""
        idxs = range(len(lease.chunk_nbytes)) if chunks is None else chunks
        return [self.slot_view(lease.slot_of(i))[:lease.chunk_nbytes[i]] for i in idxs]

    def verify(self, lease: Lease, chunks: list[int] | None = None) -> list[int]:
        """Chunks (all arrived ones by default) whose slot bytes do not match the checksum their producer
        sent (empty if none sent)."""
        bad = []
        for idx in sorted(lease.arrived) if chunks is None else chunks:
            notice = lease.arrived[idx]
            if notice.crc is not None:
                data = self.slot_view(lease.slot_of(idx))[:notice.nbytes]
                if zlib.crc32(data.cpu().numpy()) != notice.crc:
                    bad.append(idx)
        return bad

    def wait_arrivals(self, timeout_s: float, seen: int | None = None) -> bool:
        """Whether chunks arrived after the caller read `arrivals == seen` (default: now), waiting up to the
        timeout; read before a look at the transfers, a chunk landing after that look ends the wait at once."""
        self.awaited_until = time.monotonic() + timeout_s  # the pump may hurry meanwhile (poll_pace.py)
        try:
            with self._arrived:
                since = self.arrivals if seen is None else seen
                return self._arrived.wait_for(lambda: self.arrivals != since, timeout_s)
        finally:  # the engine steps now, and waits again within lease_poll_s if still idle: so long, no more
            self.awaited_until = min(self.awaited_until, time.monotonic() + self.cfg.lease_poll_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(0)
        self.agent.deregister(self.region)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        noticed = -1e9  # when the last chunk notice came
        while not self._stop.is_set():
            try:  # how often it looks: poll_pace.py
                settling, receiving = self.book.settle(), self.pool.receiving()
                streaming = poll_pace.streaming(self.cfg, time.monotonic(), noticed, self.awaited_until, receiving,
                                                self.pool.under_way)
                events = dict(poller.poll(poll_pace.poll_timeout_ms(self.cfg, settling, streaming, receiving)))
                if not events and (settling or streaming):
                    time.sleep(self.cfg.stream_poll_s if streaming else self.cfg.busy_poll_s)
                if self._sock in events:
                    self._drain_socket()
                if self._pump_notifications():
                    noticed = time.monotonic()
            except Exception:  # the only thread serving leases and notices: every later transfer needs it
                log.exception("consumer endpoint %s: unexpected error; serving on", self.address)
                self.book.count("endpoint_loop_errors")
                time.sleep(self.cfg.idle_poll_s)  # a fault that repeats must not spin a core

    def _drain_socket(self) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            ident, payload = frames[0], frames[-1]
            self._sock.send_multipart([ident, self._handle(payload if len(frames) > 1 else b"")])

    def _handle(self, payload: bytes) -> bytes:
        try:
            opened = self.auth.open(payload)
        except AuthError as e:
            self._count_refusal(e)
            err = REFUSED if self.auth.required else wire.Error(code=e.code, message=str(e))
            return self.auth.seal_reply(None, wire.encode(err))
        try:
            msg = wire.decode_request(opened.body)
        except wire.WireError as e:
            log.warning("invalid message from %s: %s", opened.sender[:64], e)
            return self.auth.seal_reply(opened, wire.encode(wire.Error(code=e.code, message=str(e))))
        return self.auth.seal_reply(opened, wire.encode(self._dispatch(opened, msg)))

    def _count_refusal(self, e: AuthError) -> None:
        """Counted always, logged at most every 5 s: a flood of garbage must not flood the log too."""
        self._refused += 1
        self.book.count(f"refused_{e.code}")
        now = time.monotonic()
        if now - self._refused_logged_at > 5:
            log.warning("refused control frame (%d refused so far): %s", self._refused, e)
            self._refused_logged_at = now

    def _dispatch(self, opened: Opened, msg: wire.Message) -> wire.Message:
        try:  # a bad request must never take the service down (its sender's check included)
            why = forbidden(opened.sender, msg, self.producers, self.pool)
            if why:
                log.warning("forbidden %s from %s: %s", msg.type, opened.sender[:64], why)
                self.book.count("forbidden_messages")
                reply: wire.Message = wire.Error(code="forbidden", message=why)
            else:
                reply = getattr(self, f"_on_{msg.type}")(msg)
        except Exception as e:
            log.exception("error handling %s", msg.type)
            reply = wire.Error(code="internal", message=f"{type(e).__name__}: {e}")
        reply.rid = msg.rid
        return reply

    def _on_hello(self, msg: wire.Hello) -> wire.Message:
        me = f"consumer {self.address}"
        diffs = msg.layout.differences(self.layout, mine="producer", theirs=me)
        if msg.chunk_tokens != self.cfg.chunk_tokens:
            diffs.append(f"{me} has chunk_tokens={self.cfg.chunk_tokens}, producer has chunk_tokens="
                         f"{msg.chunk_tokens} (set the same connector chunk_tokens on both roles)")
        if msg.layout.tp_size != self.layout.tp_size:
            diffs.append(f"tensor parallel sizes differ ({me} TP={self.layout.tp_size}, producer "
                         f"TP={msg.layout.tp_size}): heterogeneous TP is not supported")
        elif msg.layout.tp_rank != self.layout.tp_rank:
            diffs.append(f"producer rank {msg.layout.tp_rank} reached {me}, which serves rank {self.layout.tp_rank}")
        if diffs:
            log.warning("rejected producer %s: %s", msg.producer_id, "; ".join(diffs))
            return wire.Reject(reasons=diffs)
        hold = 0.0 if self._loopback_only else write_hold_s(msg.tcp_retries2)  # producers on this host: no link to cut
        if refused := self.producers.hello(msg, hold):
            return wire.Reject(reasons=[refused])
        if hold > self.cfg.fence_timeout_s:
            log.info(held_rest(msg.producer_id, msg.tcp_retries2, self.cfg.fence_timeout_s))
        return wire.Welcome(incarnation=self.incarnation, layout=self.layout,
                            agent_name=self.agent.name, agent_meta=self.agent.metadata(),
                            chunk_tokens=self.cfg.chunk_tokens, slot_bytes=self.slot_bytes,
                            num_slots=self.pool.num_slots, region_addr=self.region.addr,
                            mem_type=self.region.mem_type, dev_id=self.region.dev_id)

    def _on_alloc(self, msg: wire.Alloc) -> wire.Message:
        if self.producers.owner(msg.incarnation) is None:
            return wire.Error(code="handshake_required",
                              message=f"consumer incarnation {self.incarnation[:12]} has not met this producer")
        if msg.weights_fingerprint != self.layout.weights_fingerprint:
            return wire.Error(code="mismatch", message=f"producer weights {msg.weights_fingerprint!r}, "
                              f"consumer {self.address} weights {self.layout.weights_fingerprint!r}")
        return self.desk.alloc(msg, self.producers.write_hold_of(msg.incarnation))

    def _on_renew(self, msg: wire.Renew) -> wire.Message:
        return wire.Ack(ok=self.pool.renew(msg.transfer_id, msg.epoch, msg.ttl_s) is not None)

    def _on_progress(self, msg: wire.Progress) -> wire.Message:
        return self.desk.progress(msg)

    def _on_pending(self, msg: wire.Pending) -> wire.Message:
        self.book.sign_of_life(msg.transfer_id)
        self.book.count("pending_announcements")
        return wire.Ack(ok=True)

    def _on_release(self, msg: wire.Release) -> wire.Message:
        """A producer's release also says it writes no more to that lease (unless it gave writes up on their
        way): ended by either side before its deadline, its slots then rest only quarantine_s (quarantine.py)."""
        self.desk.queue.leave(msg.transfer_id)
        lease = self.pool.live(msg.transfer_id)  # once: a second look may find it expired in between
        if msg.reason and (msg.epoch == 0 or lease is None or lease.epoch == msg.epoch):
            log.info("producer gave up on %s: %s", msg.transfer_id, msg.reason)
            self.book.fail(msg.transfer_id, f"producer gave up: {msg.reason}")
            if msg.writes_done:
                self.pool.stopped(msg.transfer_id, msg.epoch)
            return wire.Ack(ok=True)
        released = self.pool.release(msg.transfer_id, msg.epoch, producer_stopped=msg.writes_done)
        if not released and msg.writes_done:  # the consumer ended it before (a cancel)
            self.pool.stopped(msg.transfer_id, msg.epoch)
        return wire.Ack(ok=released)

    def _on_withdraw(self, msg: wire.Withdraw) -> wire.Message:
        self.desk.withdraw(msg)
        return wire.Ack(ok=True)

    def _on_cancel(self, msg: wire.Cancel) -> wire.Message:
        self.book.discard(msg.transfer_id)
        return wire.Ack(ok=True)

    def _on_prefill_answered(self, msg: wire.PrefillAnswered) -> wire.Message:
        self.book.answered.record(msg.transfer_id, msg.answered_s_ago, msg.prefill)
        return wire.Ack(ok=True)

    def _on_stats(self, msg: wire.Stats) -> wire.Message:
        s, ranks = self.pool.stats(), self.layout.tp_size if self.cfg.port else 1  # a set port: rank r on port + r
        return wire.PoolStatus(incarnation=self.incarnation, total=s.total, free=s.free, used=s.used,
                               quarantined=s.quarantined, expired_total=s.expired_total,
                               dropped_total=s.dropped_total, counters=self.book.snapshot(), ranks=ranks)

    def _on_trace(self, msg: wire.TraceQuery) -> wire.Message:
        t = self.book.trace(msg.transfer_id)
        if t is None:
            return wire.TransferTrace(found=False)
        return wire.TransferTrace(found=True, state=t["state"], reason=t["reason"], ms=t["ms"])

    def _pump_notifications(self) -> bool:
        """Accept the chunk notices NIXL delivered; whether any chunk landed."""
        got = False
        for sender, msgs in self.agent.notifications().items():
            for raw in msgs:
                try:
                    got = self.intake.take(sender, raw) or got
                except Exception:  # the batch's other notices are still read: each is a transfer's chunk
                    log.exception("notification from %s: unexpected error", sender)
                    self.book.count("notice_errors")
        if got:
            with self._arrived:
                self.arrivals += 1
                self._arrived.notify_all()
        return got

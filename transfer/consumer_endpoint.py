"""Consumer endpoint: the handshake/lease service and the NIXL notification pump, one thread.

It owns the slot region (registered once at start), the slot pool and the NIXL agent
that producers write into. One thread serves both the ZMQ ROUTER socket and NIXL
notifications; it polls at `busy_poll_s` while leases are live and sleeps in
`idle_poll_s` steps otherwise, so an idle consumer costs no CPU.
"""
from __future__ import annotations

import hmac
import logging
import threading
import time
import uuid
import zlib
from collections import OrderedDict

import torch
import zmq

from transfer import wire
from transfer.layout import KVLayout
from transfer.threads import start_io_thread
from transfer.nixl_agent import NixlAgent
from transfer.notice import ChunkNotice, NoticeError
from transfer.slot_pool import Lease, SlotPool

log = logging.getLogger("kvbridge.consumer")


class ConsumerEndpoint:
    def __init__(self, layout: KVLayout, chunk_tokens: int, num_slots: int, host: str = "127.0.0.1",
                 port: int = 0, secret: str | None = None, device: str = "cpu",
                 quarantine_s: float = 2.0, unclaimed_ttl_s: float = 30.0,
                 busy_poll_s: float = 0.0005, idle_poll_s: float = 0.05) -> None:
        self.layout = layout
        self.chunk_tokens = chunk_tokens
        self.slot_bytes = layout.chunk_bytes(chunk_tokens)
        self.incarnation = uuid.uuid4().hex
        self.secret = secret
        self.unclaimed_ttl_s = unclaimed_ttl_s
        self._busy_poll_ms = busy_poll_s * 1000
        self._idle_poll_ms = idle_poll_s * 1000
        self.agent = NixlAgent(f"kvb-consumer-{self.incarnation[:12]}")
        self.region = self.agent.register(torch.zeros(num_slots * self.slot_bytes, dtype=torch.uint8,
                                                      device=device))
        self.pool = SlotPool(num_slots, self.slot_bytes, quarantine_s)
        self.counters: dict[str, int] = {}
        self._discarded: dict[str, float] = {}
        self._discard_lock = threading.Lock()  # guards _discarded and _traces (worker and endpoint threads)
        self._traces: OrderedDict[str, dict] = OrderedDict()
        self._producers: dict[str, tuple[str, str]] = {}  # incarnation -> (producer_id, agent name)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 8 * wire.MAX_MESSAGE_BYTES)
        if port:
            self._sock.bind(f"tcp://{host}:{port}")
        else:
            port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"{host}:{port}"
        self._stop = threading.Event()
        self._arrived = threading.Condition()
        self._thread = start_io_thread(self._run, "kvbridge-consumer")
        log.info("consumer endpoint %s incarnation %s: %d slots x %d bytes (%d tokens)",
                 self.address, self.incarnation[:12], num_slots, self.slot_bytes, chunk_tokens)

    def slot_view(self, slot: int) -> torch.Tensor:
        return self.region.tensor[slot * self.slot_bytes:(slot + 1) * self.slot_bytes]

    def verify(self, lease: Lease) -> list[int]:
        """Chunks whose slot bytes do not match the checksum their producer sent (empty if none sent)."""
        bad = []
        for idx, notice in sorted(lease.arrived.items()):
            if notice.crc is not None:
                data = self.slot_view(lease.slots[idx])[:notice.nbytes]
                if zlib.crc32(data.cpu().numpy()) != notice.crc:
                    bad.append(idx)
        return bad

    def discard(self, transfer_id: str, remember_s: float = 60.0) -> None:
        """The decode request this transfer was for has ended: free its lease now, and refuse (or free on
        arrival) anything a producer still sends for it. The producer's next renewal fails and it stops."""
        with self._discard_lock:
            now = time.monotonic()
            self._discarded = {t: exp for t, exp in self._discarded.items() if exp > now}
            self._discarded[transfer_id] = now + remember_s
        if self.pool.release(transfer_id):
            self.count("transfers_discarded")

    def is_discarded(self, transfer_id: str) -> bool:
        with self._discard_lock:
            return self._discarded.get(transfer_id, 0) > time.monotonic()

    def count(self, name: str, n: int = 1) -> None:
        """Connector counters, reported in the Stats reply (the worker has no HTTP /metrics of its own)."""
        self.counters[name] = self.counters.get(name, 0) + n

    def record_trace(self, trace: dict, keep: int = 1024) -> None:
        """A finished transfer's state history, kept for the router's /debug/requests."""
        with self._discard_lock:
            self._traces[trace["transfer_id"]] = trace
            while len(self._traces) > keep:
                self._traces.popitem(last=False)

    def wait_arrivals(self, timeout_s: float) -> None:
        """Block until any chunk arrives or the timeout passes (for callers that need to wait)."""
        with self._arrived:
            self._arrived.wait(timeout_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(0)
        self.agent.deregister(self.region)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            busy = self.pool.stats().used > 0
            events = dict(poller.poll(self._busy_poll_ms if busy else self._idle_poll_ms))
            if self._sock in events:
                self._drain_socket()
            self._pump_notifications()

    def _drain_socket(self) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            ident, payload = frames[0], frames[-1]
            reply = self._handle(payload if len(frames) > 1 else b"")
            self._sock.send_multipart([ident, wire.encode(reply)])

    def _handle(self, payload: bytes) -> wire._Msg:
        try:
            msg = wire.decode_request(payload)
        except wire.WireError as e:
            log.warning("rejected frame: %s", e)
            return wire.Error(code=e.code, message=str(e))
        if self.secret is not None and not hmac.compare_digest(msg.secret or "", self.secret):
            log.warning("rejected %s: wrong or missing shared secret", msg.type)
            return wire.Error(rid=msg.rid, code="unauthorized", message="shared secret missing or wrong")
        try:
            reply = getattr(self, f"_on_{msg.type}")(msg)
        except Exception as e:  # a bad request must never take the service down
            log.exception("error handling %s", msg.type)
            reply = wire.Error(code="internal", message=f"{type(e).__name__}: {e}")
        reply.rid = msg.rid
        return reply

    def _on_hello(self, msg: wire.Hello) -> wire._Msg:
        diffs = msg.layout.differences(self.layout, mine="producer", theirs=f"consumer {self.address}")
        if diffs:
            log.warning("rejected producer %s: %s", msg.agent_name, "; ".join(diffs))
            return wire.Reject(reasons=diffs)
        producer_id = msg.producer_id
        for inc, (pid, agent) in list(self._producers.items()):
            if pid == producer_id and inc != msg.incarnation:
                n = self.pool.release_producer(inc)
                self.agent.remove_remote(agent)
                del self._producers[inc]
                log.info("producer %s restarted (incarnation %s -> %s): dropped stale agent, "
                         "ended %d leases", producer_id, inc[:12], msg.incarnation[:12], n)
        if msg.incarnation not in self._producers:
            self._producers[msg.incarnation] = (producer_id, self.agent.add_remote(msg.agent_meta))
        return wire.Welcome(incarnation=self.incarnation, layout=self.layout,
                            agent_name=self.agent.name, agent_meta=self.agent.metadata(),
                            chunk_tokens=self.chunk_tokens, slot_bytes=self.slot_bytes,
                            num_slots=self.pool.num_slots, region_addr=self.region.addr,
                            mem_type=self.region.mem_type, dev_id=self.region.dev_id)

    def _on_alloc(self, msg: wire.Alloc) -> wire._Msg:
        if msg.incarnation not in self._producers:
            return wire.Error(code="handshake_required",
                              message=f"consumer incarnation {self.incarnation[:12]} has not met this producer")
        if self.is_discarded(msg.transfer_id):
            return wire.Error(code="cancelled", message=f"transfer {msg.transfer_id} was cancelled by its consumer")
        if msg.n_chunks > self.pool.num_slots:
            return wire.Error(code="too_large", message=f"{msg.n_chunks} chunks requested, "
                              f"the pool has {self.pool.num_slots} slots in all")
        lease = self.pool.grant(msg.transfer_id, msg.n_chunks, msg.ttl_s, msg.incarnation)
        if lease is None:
            free = self.pool.stats().free
            return wire.NoCapacity(transfer_id=msg.transfer_id, free_slots=free, retry_after_s=0.05)
        offsets = [self.region.addr + s * self.slot_bytes for s in lease.slots]
        return wire.Grant(transfer_id=msg.transfer_id, epoch=lease.epoch, offsets=offsets, ttl_s=msg.ttl_s)

    def _on_renew(self, msg: wire.Renew) -> wire._Msg:
        return wire.Ack(ok=self.pool.renew(msg.transfer_id, msg.epoch, msg.ttl_s) is not None)

    def _on_release(self, msg: wire.Release) -> wire._Msg:
        return wire.Ack(ok=self.pool.release(msg.transfer_id, msg.epoch))

    def _on_cancel(self, msg: wire.Cancel) -> wire._Msg:
        self.discard(msg.transfer_id)
        return wire.Ack(ok=True)

    def _on_stats(self, msg: wire.Stats) -> wire._Msg:
        s = self.pool.stats()
        return wire.PoolStatus(incarnation=self.incarnation, total=s.total, free=s.free, used=s.used,
                               quarantined=s.quarantined, expired_total=s.expired_total,
                               dropped_total=s.dropped_total, counters=dict(self.counters))

    def _on_trace(self, msg: wire.TraceQuery) -> wire._Msg:
        with self._discard_lock:
            t = self._traces.get(msg.transfer_id)
        if t is None:
            return wire.TransferTrace(found=False)
        return wire.TransferTrace(found=True, state=t["state"], reason=t["reason"], ms=t["ms"])

    def _pump_notifications(self) -> None:
        got = False
        for sender, msgs in self.agent.notifications().items():
            for raw in msgs:
                try:
                    notice = ChunkNotice.decode(raw)
                except NoticeError as e:
                    self.pool.count_drop()
                    log.warning("dropped notification from %s: %s", sender, e)
                    continue
                if self.pool.accept(notice):
                    got = True
                    self.count("chunks_received")
                    self.count("bytes_received", notice.nbytes)
                    lease = self.pool.live(notice.transfer_id)
                    if self.is_discarded(notice.transfer_id):
                        self.pool.release(notice.transfer_id)
                    elif lease is not None and lease.complete:
                        self.pool.renew(lease.transfer_id, lease.epoch, self.unclaimed_ttl_s)
                else:
                    log.info("dropped chunk %d of %s: no live lease with epoch %d",
                             notice.chunk, notice.transfer_id, notice.epoch)
        if got:
            with self._arrived:
                self._arrived.notify_all()

"""The consumer's intake of producers' NIXL notifications: chunk notices and lease fences (notice.py).

A chunk notice is accepted only against a live lease (slot_pool.py says what must match); a fence frees nothing
by itself, it shortens the rest of its lease's slots (quarantine.py), and counts only when it names a producer
incarnation we know and its sender is that producer's NIXL agent. NIXL's sender name is the sender's own claim:
what a stranger lacks is the incarnation, which travels only over authenticated control frames, as for notices.
"""
from __future__ import annotations

import logging

from transfer.notice import ChunkNotice, LeaseFence, NoticeError, decode_notification
from transfer.producer_registry import ProducerRegistry
from transfer.receive_book import ReceiveBook
from transfer.slot_pool import SlotPool

log = logging.getLogger("kvbridge.consumer")


class NoticeIntake:
    def __init__(self, pool: SlotPool, book: ReceiveBook, producers: ProducerRegistry, unclaimed_ttl_s: float) -> None:
        self._pool, self._book, self._producers = pool, book, producers
        self._unclaimed_ttl_s = unclaimed_ttl_s

    def take(self, sender: str, raw: bytes) -> bool:
        """One notification from NIXL agent `sender`: whether it was a chunk notice, accepted."""
        try:
            notice = decode_notification(raw)
        except NoticeError as e:
            self._pool.count_drop()
            log.warning("dropped notification from %s: %s", sender, e)
            return False
        if isinstance(notice, LeaseFence):
            self._fence(sender, notice)
            return False
        return self._chunk(notice)

    def _fence(self, sender: str, fence: LeaseFence) -> None:
        if self._producers.agent_of(fence.incarnation) != sender:
            self._book.count("fences_dropped")
            log.warning("dropped a fence for %s from %s: not the agent of producer %s", fence.transfer_id, sender,
                        fence.incarnation[:12])
            return
        self._book.count("fences_received")
        if self._pool.fence(fence.transfer_id, fence.epoch, fence.incarnation):
            log.debug("fence for %s epoch %d from %s", fence.transfer_id, fence.epoch, sender)

    def _chunk(self, notice: ChunkNotice) -> bool:
        why = self._pool.accept(notice)
        if why:
            log.info("dropped chunk %d of %s (epoch %d): %s", notice.chunk, notice.transfer_id, notice.epoch, why)
            lease = self._pool.live(notice.transfer_id)
            if lease is not None and (lease.epoch, lease.producer) == (notice.epoch, notice.incarnation):
                self._book.fail(notice.transfer_id, f"bad chunk: {why}")  # its own producer erred
            return False
        self._book.count("chunks_received")
        self._book.count("bytes_received", notice.nbytes)
        lease = self._pool.live(notice.transfer_id)
        if lease is not None and lease.complete:
            self._pool.renew(lease.transfer_id, lease.epoch, self._unclaimed_ttl_s)
        return True

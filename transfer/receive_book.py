"""The consumer's book of transfers: what the decode engine expects, what arrived, what failed.

The worker (engine thread) says which transfers it expects (`expect`), asks where each stands
(`status`), takes a complete one to scatter (`claim`) and says when it is done (`finish`). The
endpoint thread records grants, failures reported by producers, cancels from the router, its word that
a prefill answered (answered_notices.py), and expired leases. Both threads meet only here, under one lock.

A claimed lease stays pinned until the fence recorded after its scatter is done (`settle`, called by
the endpoint thread and by `finish`): on a GPU the scatter is still queued when `finish` is called, and a
slot freed then could be granted and overwritten while the scatter reads it.

A transfer read by `n > 1` engine requests (parallel sampling) is claimed `claims` times; its slots are
freed after the last claim, and not while another request expecting it is unfinished (the same prompt twice
in one OpenAI request: both read its one transfer). A failure is remembered for `remember_s` even when no
request expects it yet, so a request scheduled after its producer gave up fails at once; a request that
stopped waiting (EXPIRED) is remembered too, so a late producer is refused instead of leased.
Remembered failures and cancels (at most `max_ended`, ended_keys.py) and traces (`keep_traces`) are
bounded: a flood of cancels cannot grow the consumer's memory.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from transfer.answered_notices import AnsweredNotices
from transfer.device_fence import COMPLETED, Fence
from transfer.ended_keys import EndedKeys
from transfer.identity import transfer_id_of
from transfer.key_stamps import KeyStamps
from transfer.slot_pool import Lease, SlotPool


DELIVERED = "delivered: every request expecting it has read it"


class Arrival(str, Enum):
    WAITING = "WAITING"      # no lease yet (or the last attempt's lease ended without a failure)
    RECEIVING = "RECEIVING"  # leased, chunks still on their way
    COMPLETE = "COMPLETE"    # every chunk arrived: ready to claim
    ENDED = "ENDED"          # failed, cancelled or expired: the reason says which


@dataclass
class _Expected:
    num_tokens: int
    token_hash: str
    claims_left: int
    held_chunks: int  # leading chunks the decode node computed itself (its prefix cache): not to be pushed
    waiting: int = 0  # requests that called expect and not finish yet (fewer than claims_left when some never come)


class ReceiveBook:
    def __init__(self, pool: SlotPool, unclaimed_ttl_s: float, remember_s: float = 60.0, keep_traces: int = 1024,
                 clock=time.monotonic, max_ended: int = 65536, first_contact_s: float = 4.0) -> None:
        self.max_ended = max_ended
        self.pool = pool
        self.unclaimed_ttl_s = unclaimed_ttl_s
        self.remember_s = remember_s
        self.keep_traces = keep_traces
        self._clock = clock
        self._lock = threading.Lock()
        self._expected: dict[str, _Expected] = {}
        self._granted: dict[str, tuple[int, int, str]] = {}   # key -> (epoch, num_tokens, token_hash)
        self._ended = EndedKeys(remember_s, max_ended, clock)
        self._traces: OrderedDict[str, dict] = OrderedDict()
        self._first_alloc: dict[str, float] = {}  # key -> when an ALLOC for it first came before its request
        # (scatter's fence, key, lease, last claim, window chunks freed by it or None for a whole-lease claim)
        self._settling: list[tuple[Fence, str, Lease, bool, int | None]] = []
        self._readers: dict[str, str] = {}  # windowed key -> the one request reading its stream
        self._signs = KeyStamps(remember_s, max_ended, clock)  # key: its producer showed life without chunks
        self.answered = AnsweredNotices(first_contact_s, remember_s, max_ended, clock=clock)  # the router's word
        self.counters: dict[str, int] = {}

    # --- engine (worker) side
    def expect(self, key: str, num_tokens: int, token_hash: str, claims: int = 1, held_chunks: int = 0) -> None:
        """A decode request will read this transfer (called once per engine request; children of one
        prompt share the key and the first call's claim count). `held_chunks` leading chunks are already
        in its blocks (the decode node's own prefix cache): the producer is told not to push them."""
        with self._lock:
            self._expected.setdefault(key, _Expected(num_tokens, token_hash, max(1, claims), held_chunks)).waiting += 1

    def held_chunks(self, key: str) -> int | None:
        """Leading chunks the expecting request already holds; None while no request expects the key."""
        with self._lock:
            exp = self._expected.get(key)
            return None if exp is None else exp.held_chunks

    def status(self, key: str) -> tuple[Arrival, str]:
        reason = self._ended.reason(key)
        if reason:
            return Arrival.ENDED, reason
        lease = self.pool.live(key)
        if lease is None:
            return Arrival.WAITING, ""
        return (Arrival.COMPLETE if lease.complete else Arrival.RECEIVING), ""

    def claim(self, key: str) -> tuple[Lease | None, str]:
        """Pin a complete lease for scattering after checking it carries the expected prompt:
        (lease, '') or (None, why it must not be used)."""
        lease = self.pool.pin(key)
        if lease is None:
            return None, "no complete lease to claim"
        why = self._not_expected(key, lease)
        if why:
            self.pool.unpin(lease, release=True)
            return None, why
        return lease, ""

    def take_window(self, key: str, reader: str) -> tuple[Lease | None, list[int], str]:
        """A windowed lease streams into its request as it lands: the chunks that arrived in order since the
        last take, pinned until `window_done` (lease, chunk indices, ''); (None, [], '') when the lease is
        not windowed; (None, [], why) when it must not be used. One request reads a stream: it frees its
        slots as it goes, so another request expecting the same prompt recomputes."""
        lease = self.pool.live(key)
        if lease is None or not lease.windowed:
            return None, [], ""
        with self._lock:
            first = self._readers.setdefault(key, reader)
        why = self._not_expected(key, lease) or ("" if first == reader else
                                                 "a streamed transfer feeds one request, another one reads it")
        if why:
            return None, [], why
        _, chunks = self.pool.take_front(key, lease.epoch)  # none if another attempt replaced it meanwhile
        return lease, chunks, ""

    def window_done(self, key: str, lease: Lease, upto: int, fence: Fence) -> None:
        """The scatter of the chunks below `upto` is queued; once `fence` is done their slots take new chunks."""
        with self._lock:
            self._settling.append((fence, key, lease, False, upto))
        self.settle()

    def _not_expected(self, key: str, lease: Lease) -> str:
        """Why this lease must not be read by the request expecting `key` ('' when it may)."""
        with self._lock:
            exp, granted = self._expected.get(key), self._granted.get(key)
        if exp is None:
            return "no request expects this transfer"
        if granted is None or granted[0] != lease.epoch:
            return f"lease epoch {lease.epoch} was not granted through ALLOC"
        if granted[1:] != (exp.num_tokens, exp.token_hash):
            return (f"transfer carries {granted[1]} tokens hashing to {granted[2][:12]}, the request has "
                    f"{exp.num_tokens} tokens hashing to {exp.token_hash[:12]}")
        return ""

    def finish(self, key: str, lease: Lease | None, trace: dict, fence: Fence = COMPLETED) -> None:
        """One claimer is done (scattered, failed, expired or aborted): once `fence` is done, unpin, and
        after the last claim free the slots; the expectation is forgotten now. Records the trace and a
        counter of its final state."""
        with self._lock:
            exp = self._expected.get(key)
            last = exp is None or (exp.claims_left <= 1 and exp.waiting <= 1)
            if exp is not None:
                exp.claims_left, exp.waiting = exp.claims_left - 1, exp.waiting - 1
                if last:
                    self._drop_locked(key)
                    self._signs.forget(key)
            self._traces[key] = trace
            self._traces.move_to_end(key)
            while len(self._traces) > self.keep_traces:
                self._traces.popitem(last=False)
        self.count(f"transfers_{trace['state'].lower()}")
        # A lease after the last reader would hold slots for unclaimed_ttl_s: after a request that stopped waiting
        # (a prefill queue behind a storm is late), or a delivered one (a prompt repeated in one request is pushed
        # once per repeat; a repeat scheduled after the others read it recomputes at once instead of waiting)
        if last and trace["state"] == "EXPIRED":
            self._ended.remember(key, f"its request stopped waiting ({trace.get('reason') or 'expired'})")
        elif last and trace["state"] == "SCATTERED":
            self._ended.remember(key, DELIVERED)
        if lease is not None:
            with self._lock:
                self._settling.append((fence, key, lease, last, None))
            self.settle()
        elif last:
            self.pool.release(key)

    def settle(self) -> int:
        """Unpin the leases whose scatter has completed on the device; returns how many still wait."""
        with self._lock:
            done, waiting = [], []
            for s in self._settling:
                (done if s[0].done() else waiting).append(s)
            self._settling = waiting
        for _, key, lease, last, upto in done:
            if upto is not None:
                self.pool.free_front(lease, upto)
                continue
            self.pool.unpin(lease, release=last)
            if not last:
                self.pool.renew(key, lease.epoch, self.unclaimed_ttl_s)  # the other claimers still read it
        return len(waiting)

    # --- endpoint (control thread) side
    def alloc_waits(self, key: str, wait_s: float) -> bool:
        """Whether an ALLOC that came before its decode request should be retried shortly: the request is
        usually scheduled within milliseconds and says which leading chunks the decode already holds.
        After `wait_s` the grant goes ahead for every chunk."""
        now = self._clock()
        with self._lock:
            if len(self._first_alloc) > 4096:  # bounded: ALLOCs whose request never came are forgotten
                self._first_alloc = {k: t for k, t in self._first_alloc.items() if now - t < 10 * wait_s + 1}
            waits = now - self._first_alloc.setdefault(key, now) < wait_s
            if not waits:
                self._first_alloc.pop(key, None)
        self._signs.stamp(key)  # its producer reached this node: not silent, only early
        return waits

    def check_alloc(self, key: str, num_tokens: int, token_hash: str) -> str:
        """'' when an ALLOC may be granted; else why not (and the transfer is failed for its request)."""
        reason = self._ended.reason(key)
        if reason:
            return reason
        with self._lock:
            exp = self._expected.get(key)
        if exp is not None and (exp.num_tokens, exp.token_hash) != (num_tokens, token_hash):
            why = (f"ALLOC for {num_tokens} tokens hashing to {token_hash[:12]} does not match the request "
                   f"({exp.num_tokens} tokens hashing to {exp.token_hash[:12]})")
            self.fail(key, why)
            return why
        return ""

    def granted(self, key: str, epoch: int, num_tokens: int, token_hash: str) -> None:
        with self._lock:
            self._granted[key] = (epoch, num_tokens, token_hash)
        self.sign_of_life(key)

    def sign_of_life(self, key: str) -> None:
        """The producer of `key` is alive without a lease in use (the request waits in the prefill's queue,
        or for slots here): the waiting decode request's timeout restarts from now."""
        self._signs.stamp(key)

    def last_sign(self, key: str) -> float:
        """When `key`'s producer last showed life without a lease in use (0 if never)."""
        return self._signs.at(key)

    def fail(self, key: str, reason: str) -> None:
        """The transfer cannot be delivered (its producer gave up, a chunk was wrong, its lease expired):
        its request follows the load-failure policy now, and its slots are released."""
        self._ended.remember(key, reason)
        self._forget_unread([key])
        self.pool.release(key)

    def expired(self, key: str) -> None:
        """The pool's expiry hook (runs under the pool's lock, so it only takes note)."""
        self._ended.remember(key, "lease expired: its producer stopped renewing it")
        self._forget_unread([key])

    def discard(self, transfer_id: str) -> None:
        """The router's request is gone (`transfer_id`: every prompt's transfer), or one engine request will
        not read its prompt's (`transfer_id` is that transfer's key): refused from now on and freed."""
        self._ended.remember(transfer_id, "cancelled: the request ended")
        with self._lock:
            keys = [k for k in self._granted.keys() | self._expected.keys()
                    if transfer_id in (k, transfer_id_of(k))]
        self._forget_unread(keys)
        for lease_key in self.pool.keys_of(transfer_id):
            if self.pool.release(lease_key):
                self.count("transfers_discarded")

    def _forget_unread(self, keys: list[str]) -> None:
        """These transfers ended: what the book holds for them goes unless a request still waits for one (its
        `finish` forgets it). Else a grant no request ever finishes (cancelled before it was scheduled, left
        unclaimed), or claims that never come, would stay here for good."""
        with self._lock:
            for key in keys:
                exp = self._expected.get(key)
                if exp is None or exp.waiting <= 0:
                    self._drop_locked(key)

    def _drop_locked(self, key: str) -> None:
        """Forget what the book holds for a transfer no request will read any more (under the lock)."""
        self._expected.pop(key, None)
        self._granted.pop(key, None)
        self._readers.pop(key, None)

    def trace(self, transfer_id: str) -> dict | None:
        with self._lock:
            for key in reversed(self._traces):
                if key == transfer_id or transfer_id_of(key) == transfer_id:
                    return self._traces[key]
        return None

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counters)

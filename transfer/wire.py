"""Handshake and lease control messages: one versioned module, msgpack on the wire, no pickle.

Every message carries the protocol version `v` and a request id `rid` echoed in the reply (so a late
reply is never mistaken for the answer to a newer request). On a socket each message travels as the
body of an authenticated frame (`control_auth.py`); no secret is ever part of a message.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from transfer.layout import KVLayout

# 12: Hello.tcp_retries2, .boot_id; 11: PrefillAnswered.prefill; 10: PrefillAnswered.answered_s_ago; 9: Withdraw;
# 8: PoolStatus.ranks; 7: PrefillAnswered; 6: Grant.incarnation; 5: windowed grants (Grant.chunks,
# Progress/WindowState) and Pending; 4: HMAC frames
PROTOCOL_VERSION = 12
MAX_MESSAGE_BYTES = 1 << 20
# The longest prompt an ALLOC may carry (16.7M tokens, beyond any model's context today): the consumer builds
# one entry per chunk of it, so an unbounded count from a buggy or hostile peer would stall or exhaust it.
MAX_PROMPT_TOKENS = 1 << 24
# engine requests that may read one transfer (a request's `n`, in the decode leg's kv_transfer_params); a request
# with more is served aggregated by the router
MAX_CLAIMS = 256
# how far back a PrefillAnswered may date the prefill's answer (the router sends it 0.1 s late, a stalled one later)
MAX_ANSWER_AGE_S = 60.0


class WireError(ValueError):
    """A frame that is not a valid message; `code` goes back to the peer in an Error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    v: int = PROTOCOL_VERSION
    rid: int = 0


class _Request(_Msg):
    pass


class Hello(_Request):
    """A producer introduces itself. `producer_id` names the node and rank; `generation` grows with each start of
    it, so a restart ends the old process's leases and a stale one cannot. `tcp_retries2`, `boot_id`: write_hold.py"""
    type: Literal["hello"] = "hello"
    producer_id: str = Field(min_length=1, max_length=256)
    generation: int = Field(ge=0)
    incarnation: str = Field(max_length=64)
    layout: KVLayout
    chunk_tokens: int = Field(gt=0)
    agent_name: str = Field(max_length=256)
    agent_meta: bytes
    tcp_retries2: int = Field(default=15, ge=0, le=255)
    boot_id: str = Field(default="", max_length=64)


class Alloc(_Request):
    """Lease slots for one transfer (see transfer/identity.py): the key, the attempt, and the proof of
    what it carries (prompt length, prompt token hash, weights), checked against the expected request."""
    type: Literal["alloc"] = "alloc"
    incarnation: str = Field(max_length=64)
    transfer_id: str = Field(min_length=1, max_length=256)
    attempt: int = Field(default=0, ge=0)
    num_tokens: int = Field(gt=0, le=MAX_PROMPT_TOKENS)
    token_hash: str = Field(min_length=1, max_length=64)
    weights_fingerprint: str = Field(default="", max_length=64)
    ttl_s: float = Field(gt=0, le=600)
    # names this ALLOC among its producer's, so a Withdraw can say "the one I never heard answered"; 0: none
    alloc_id: int = Field(default=0, ge=0)


class Renew(_Request):
    type: Literal["renew"] = "renew"
    transfer_id: str
    epoch: int
    ttl_s: float = Field(gt=0, le=600)


class Release(_Request):
    """The producer is done with a lease it will not complete. A `reason` means it gave up: the
    consumer fails the waiting request at once instead of waiting for its load timeout. `epoch` 0
    names a transfer that never got a lease (refused handshake, no capacity). `writes_done` False: writes of
    ours to it were given up while on their way, so the release says nothing about when they land (the lease's
    slots then wait for our fence, transfer/quarantine.py)."""
    type: Literal["release"] = "release"
    transfer_id: str = Field(min_length=1, max_length=256)
    epoch: int = Field(ge=0)
    reason: str = Field(default="", max_length=1024)
    writes_done: bool = True


class Withdraw(_Request):
    """An ALLOC of ours (`alloc_id`) went unanswered: we gave its transfer up and never learnt its lease, so we write
    nothing there. A link cut mid-call can deliver that ALLOC late, and the lease it gets would hold slots for
    nobody; whether the ALLOC came before this or comes after, its slots rest quarantine_s at most (lease_desk.py)."""
    type: Literal["withdraw"] = "withdraw"
    incarnation: str = Field(max_length=64)
    transfer_id: str = Field(min_length=1, max_length=256)
    alloc_id: int = Field(gt=0)


class Progress(_Request):
    """How far may I write into this windowed lease? Renews it like RENEW (the push is alive)."""
    type: Literal["progress"] = "progress"
    transfer_id: str = Field(min_length=1, max_length=256)
    epoch: int = Field(ge=0)
    ttl_s: float = Field(gt=0, le=600)


class Pending(_Request):
    """The producer holds this transfer's request but has not asked for slots yet (it waits in the
    prefill's queue): a sign of life, so the waiting decode request does not give up on it."""
    type: Literal["pending"] = "pending"
    transfer_id: str = Field(min_length=1, max_length=256)


class Cancel(_Request):
    """From the router: the request behind this transfer is gone; free its slots, refuse its chunks."""
    type: Literal["cancel"] = "cancel"
    transfer_id: str = Field(min_length=1, max_length=256)


class PrefillAnswered(_Request):
    """From the router: the prefill node answered this transfer's request, `answered_s_ago` seconds before this
    message went (the router waits a moment to see whether the decode leg still needs it). A producer that has not
    been heard from since the answer cannot reach the consumer: its request stops waiting after `no_show_s`, unless
    `prefill` (the node as the router names it, with its up-period) is new to the consumer: its producer may still be
    shaking hands (answered_notices.py)."""
    type: Literal["prefill_answered"] = "prefill_answered"
    transfer_id: str = Field(min_length=1, max_length=256)
    answered_s_ago: float = Field(default=0.0, ge=0, le=MAX_ANSWER_AGE_S)
    prefill: str = Field(default="", max_length=256)


class Stats(_Request):
    type: Literal["stats"] = "stats"


class TraceQuery(_Request):
    """Router -> consumer: the consumer-side state history of one transfer (for /debug/requests)."""
    type: Literal["trace"] = "trace"
    transfer_id: str = Field(min_length=1, max_length=256)


class Welcome(_Msg):
    type: Literal["welcome"] = "welcome"
    incarnation: str
    layout: KVLayout
    agent_name: str
    agent_meta: bytes
    chunk_tokens: int
    slot_bytes: int
    num_slots: int
    region_addr: int
    mem_type: str
    dev_id: int


class Reject(_Msg):
    type: Literal["reject"] = "reject"
    reasons: list[str]


class Grant(_Msg):
    type: Literal["grant"] = "grant"
    transfer_id: str
    epoch: int
    offsets: list[int]
    ttl_s: float
    incarnation: str = Field(max_length=64)  # the consumer's that holds the lease: a restarted one does not
    # leading chunks the consumer already holds (its own prefix cache): not pushed; lease chunk i is chunk skip + i
    skip_chunks: int = Field(default=0, ge=0)
    # lease chunks in all; more than len(offsets) means a window: lease chunk i goes to offsets[i % len(offsets)],
    # and only below the `writable` index the last WindowState gave (len(offsets) at first)
    chunks: int = Field(default=0, ge=0)


class WindowState(_Msg):
    """Lease chunks below `writable` may be written now; `ok` False: the lease is gone."""
    type: Literal["window_state"] = "window_state"
    ok: bool
    writable: int = Field(ge=0)


class NoCapacity(_Msg):
    type: Literal["no_capacity"] = "no_capacity"
    transfer_id: str
    free_slots: int
    retry_after_s: float


class Ack(_Msg):
    type: Literal["ack"] = "ack"
    ok: bool


class PoolStatus(_Msg):
    type: Literal["pool_status"] = "pool_status"
    incarnation: str
    total: int
    free: int
    used: int
    quarantined: int
    expired_total: int
    dropped_total: int
    counters: dict[str, int] = {}
    ranks: int = Field(default=1, ge=1, le=1024)  # the node's TP ranks: each has its own endpoint (port + rank)


class TransferTrace(_Msg):
    type: Literal["transfer_trace"] = "transfer_trace"
    found: bool
    state: str = ""
    reason: str = ""
    ms: dict[str, float] = {}


class Error(_Msg):
    type: Literal["error"] = "error"
    code: str
    message: str


# Error.code of an ALLOC for a lease that already took chunks from the same producer and attempt: a second
# push of bytes the consumer has (or had). The producer ends that push without failing the transfer.
LEASE_IN_USE = "lease_in_use"


class StoreLookup(_Msg):
    """Engine -> its own worker: how many of these leading chunk keys does your store hold?"""
    type: Literal["store_lookup"] = "store_lookup"
    keys: list[Annotated[str, Field(max_length=128)]] = Field(max_length=65536)


class StoreHeld(_Msg):
    type: Literal["store_held"] = "store_held"
    held: int = Field(ge=0)


_lookups = TypeAdapter(StoreLookup)
_helds = TypeAdapter(StoreHeld)

Request = Annotated[Union[Hello, Alloc, Renew, Release, Withdraw, Progress, Pending, Cancel, PrefillAnswered,
                          Stats, TraceQuery],
                    Field(discriminator="type")]
Reply = Annotated[Union[Welcome, Reject, Grant, WindowState, NoCapacity, Ack, PoolStatus, TransferTrace, Error],
                  Field(discriminator="type")]
_requests = TypeAdapter(Request)
_replies = TypeAdapter(Reply)


Message = _Msg
ReplyMessage = Union[Welcome, Reject, Grant, WindowState, NoCapacity, Ack, PoolStatus, TransferTrace, Error]


def encode(msg: _Msg) -> bytes:
    return msgpack.packb(msg.model_dump(mode="python"), use_bin_type=True)


def _decode(raw: bytes, adapter: TypeAdapter):
    if len(raw) > MAX_MESSAGE_BYTES:
        raise WireError("too_large", f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        obj = msgpack.unpackb(raw, raw=False)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise WireError("malformed", f"not a msgpack frame: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise WireError("malformed", f"expected a map, got {type(obj).__name__}")
    if obj.get("v") != PROTOCOL_VERSION:
        raise WireError("version", f"protocol version {obj.get('v')!r}, this peer speaks {PROTOCOL_VERSION}")
    try:
        return adapter.validate_python(obj)
    except ValidationError as e:
        raise WireError("invalid", f"invalid {obj.get('type')!r} message: {e.errors()[0]['loc']}: "
                                   f"{e.errors()[0]['msg']}") from e


def decode_request(raw: bytes) -> (Hello | Alloc | Renew | Release | Withdraw | Progress | Pending | Cancel
                                   | PrefillAnswered | Stats | TraceQuery):
    return _decode(raw, _requests)


def decode_reply(raw: bytes) -> (Welcome | Reject | Grant | WindowState | NoCapacity | Ack | PoolStatus | TransferTrace
                                 | Error):
    return _decode(raw, _replies)


def decode_lookup(raw: bytes) -> StoreLookup:
    return _decode(raw, _lookups)


def decode_held(raw: bytes) -> StoreHeld:
    return _decode(raw, _helds)

"""Hostile input to the wire models and to the authenticated frames they travel in: any bytes give a
valid message or a typed error, never a crash; nothing opens as authentic that was not sealed with the key."""
from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from transfer import control_auth, wire
from transfer.control_auth import AuthError, Authenticator, Credential
from transfer.layout import KVLayout
from transfer.notice import NoticeError, decode_notification

LAYOUT = KVLayout(model_id="m", num_layers=2, num_kv_heads=2, kv_heads_per_rank=2, head_size=32, dtype="float32",
                  block_size=16, cache_layout="LBHNC")
values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text(max_size=20)
                      | st.binary(max_size=20),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=4), max_leaves=12)
frames = st.dictionaries(st.sampled_from(["v", "type", "rid", "transfer_id", "num_tokens", "token_hash", "attempt", "ttl_s",
                                          "epoch", "incarnation", "layout", "agent_meta", "producer_id", "keys"]),
                         values, max_size=8)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes(raw):
    for decode in (wire.decode_request, wire.decode_reply, wire.decode_lookup, wire.decode_held):
        try:
            decode(raw)
        except wire.WireError as e:
            assert e.code in {"malformed", "version", "invalid", "too_large"}
    try:
        decode_notification(raw)
    except NoticeError:
        pass


@settings(max_examples=400, deadline=None)
@given(frames, st.sampled_from(["hello", "alloc", "renew", "release", "stats", "trace", "grant", "store_lookup",
                                None, 7]))
def test_any_map(obj, type_):
    obj = dict(obj, type=type_)
    obj.setdefault("v", wire.PROTOCOL_VERSION)
    try:
        msg = wire.decode_request(msgpack.packb(obj, use_bin_type=True))
    except wire.WireError:
        return
    assert msg.type == type_


@given(st.text(min_size=1, max_size=50), st.integers(1, 64), st.floats(0.01, 600), st.integers(0, 2**31))
def test_valid_messages_roundtrip(tid, n, ttl, rid):
    assert wire.decode_lookup(wire.encode(wire.StoreLookup(rid=rid, keys=[tid] * n))).keys == [tid] * n
    for msg in (wire.Alloc(rid=rid, incarnation="i", transfer_id=tid, num_tokens=n, token_hash="ab" * 16,
                           attempt=n % 3, ttl_s=ttl),
                wire.Release(rid=rid, transfer_id=tid, epoch=0, reason="staging full"),
                wire.TraceQuery(rid=rid, transfer_id=tid),
                wire.Hello(rid=rid, producer_id="p", generation=rid, incarnation="i", layout=LAYOUT,
                           chunk_tokens=64, agent_name="a",
                           agent_meta=b"\x00\xff" * 10)):
        assert wire.decode_request(wire.encode(msg)) == msg


def test_layout_differences_name_every_field():
    other = LAYOUT.model_copy(update={"block_size": 128, "num_layers": 3, "tp_rank": 1})
    diffs = LAYOUT.differences(other, mine="producer", theirs="consumer decode-0")
    assert diffs == ["consumer decode-0 has num_layers=3, producer has num_layers=2",
                     "consumer decode-0 has block_size=128, producer has block_size=16"]


SECRET = b"fuzz-secret"
AUTH_CODES = {"malformed", "version", "too_large", "unauthenticated", "stale", "replayed"}
envelopes = st.fixed_dictionaries({}, optional={"v": st.just(wire.PROTOCOL_VERSION) | values, "from": values,
                                                "ts": values, "nonce": values, "body": values, "mac": values})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | envelopes.map(lambda d: msgpack.packb(d, use_bin_type=True)))
def test_any_frame_is_refused_with_a_typed_error(raw):
    """Neither side of an authenticated link opens a frame it did not seal: garbage and well-formed
    envelopes without the key alike give AuthError, never a crash or a message."""
    for opener in (lambda r: Authenticator(SECRET).open(r),
                   lambda r: Credential("router", SECRET).open_reply(r, b"n" * 16)):
        try:
            opener(raw)
        except AuthError as e:
            assert e.code in AUTH_CODES
        else:
            raise AssertionError(f"opened a frame nobody sealed: {raw!r}")


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([wire.Stats(rid=1), wire.Cancel(rid=2, transfer_id="t"),
                        wire.Release(rid=3, transfer_id="t", epoch=4, reason="r")]),
       st.integers(0, 10_000), st.integers(0, 255), st.sampled_from(["flip", "cut", "grow"]))
def test_a_mutated_authentic_frame_never_opens_to_another_message(msg, where, byte, how):
    frame, _ = Credential("producer/p", SECRET).seal(wire.encode(msg))
    i = where % len(frame)
    mutated = {"flip": frame[:i] + bytes([frame[i] ^ (byte or 1)]) + frame[i + 1:], "cut": frame[:i],
               "grow": frame[:i] + bytes([byte]) + frame[i:]}[how]
    try:
        opened = Authenticator(SECRET).open(mutated)
    except AuthError as e:
        assert e.code in AUTH_CODES
        return
    # an equivalent msgpack encoding of the same fields (uint64 vs int64 for the timestamp) is the same message
    assert (opened.sender, opened.body) == ("producer/p", wire.encode(msg))
    assert control_auth.parse(mutated)[1:3] == control_auth.parse(frame)[1:3]


def test_an_alloc_for_more_tokens_than_any_prompt_is_refused_by_the_wire_not_built():
    """The consumer would build one entry per chunk of num_tokens: 10**12 must stop at decoding, typed."""
    alloc = dict(wire.Alloc(incarnation="i", transfer_id="t", num_tokens=1, token_hash="ab", ttl_s=5).model_dump(),
                 num_tokens=10**12)
    try:
        wire.decode_request(msgpack.packb(alloc, use_bin_type=True))
    except wire.WireError as e:
        assert e.code == "invalid" and "num_tokens" in str(e)
    else:
        raise AssertionError("an ALLOC for 10**12 tokens was accepted")
    alloc["num_tokens"] = wire.MAX_PROMPT_TOKENS
    assert wire.decode_request(msgpack.packb(alloc, use_bin_type=True)).num_tokens == wire.MAX_PROMPT_TOKENS

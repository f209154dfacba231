"""Hostile input to the wire models: any bytes give a valid message or a typed error, never a crash."""
from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from transfer import wire
from transfer.layout import KVLayout
from transfer.notice import ChunkNotice, NoticeError

LAYOUT = KVLayout(model_id="m", num_layers=2, num_kv_heads=2, kv_heads_per_rank=2, head_size=32, dtype="float32",
                  block_size=16, cache_layout="LBHNC")
values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text(max_size=20)
                      | st.binary(max_size=20),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=4), max_leaves=12)
frames = st.dictionaries(st.sampled_from(["v", "type", "rid", "secret", "transfer_id", "num_tokens", "token_hash", "attempt", "ttl_s",
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
        ChunkNotice.decode(raw)
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

"""A consumer endpoint with a deployment secret, over real ZMQ and NIXL in its own process: what a peer
without the credential, or with another producer's, can and cannot do."""
from __future__ import annotations

import msgpack
import pytest
import torch
import zmq

from launch.polling import wait_for
from tests.consumer_proc import ConsumerProcess
from transfer import control_auth, wire
from transfer.consumer_endpoint import ConsumerEndpoint
from transfer.consumer_settings import ConsumerSettings
from transfer.consumer_link import PeerError
from transfer.control_auth import Credential
from transfer.credentials import CredentialError
from transfer.identity import TransferSpec
from transfer.layout import KVLayout
from transfer.producer import Producer, ProducerSettings
from transfer.states import State

SECRET = b"consumer-auth-test-secret"
LAYOUT = KVLayout(model_id="tiny", num_layers=2, num_kv_heads=2, kv_heads_per_rank=2, head_size=32,
                  dtype="float32", block_size=16, cache_layout="LBHNC")
CHUNK = 64
REFUSED = wire.Error(code="unauthenticated", message="refused")


@pytest.fixture(scope="module")
def consumer():
    c = ConsumerProcess(LAYOUT, chunk_tokens=CHUNK, num_slots=8, quarantine_s=0.2, secret=SECRET, expect_wait_s=0)
    yield c
    c.stop()


def send(address: str, frame: bytes) -> tuple[bytes, wire.Message]:
    """One raw frame; (raw reply, its message read without checking any MAC)."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://{address}")
    s.send(frame)
    assert s.poll(3000), "no reply"
    raw = s.recv()
    s.close(0)
    return raw, wire.decode_reply(control_auth.parse(raw)[3])


def call(address: str, cred: Credential, msg: wire.Message) -> wire.Message:
    """One signed request; the reply, checked as the real caller checks it."""
    frame, nonce = cred.seal(wire.encode(msg))
    raw, _ = send(address, frame)
    return wire.decode_reply(cred.open_reply(raw, nonce))


def hello(producer_id: str, layout: KVLayout = LAYOUT, generation: int = 1) -> wire.Hello:
    return wire.Hello(producer_id=producer_id, generation=generation, incarnation="i" * 32, layout=layout,
                      chunk_tokens=CHUNK, agent_name="evil", agent_meta=b"\0" * 64)


def serves(consumer: ConsumerProcess) -> None:
    """The service still answers an authentic request."""
    assert isinstance(call(consumer.address, Credential("router", SECRET), wire.Stats()), wire.PoolStatus)


def producer(name: str, secret: bytes | None = SECRET) -> Producer:
    return Producer(LAYOUT, CHUNK, ProducerSettings(producer_id=name, secret=secret, lease_ttl_s=5.0))


def test_forged_replayed_and_tampered_frames_get_one_generic_refusal(consumer):
    router = Credential("router", SECRET)
    good, _ = router.seal(wire.encode(wire.Stats(rid=3)))
    tampered = msgpack.unpackb(good)
    tampered["body"] = wire.encode(wire.Cancel(rid=3, transfer_id="someone-elses"))
    bad_frames = {
        "no secret": Credential("router", None).seal(wire.encode(wire.Stats()))[0],
        "wrong secret": Credential("router", b"guess").seal(wire.encode(wire.Stats()))[0],
        "tampered": msgpack.packb(tampered, use_bin_type=True),
        "garbage": b"\xc1garbage",
        "old protocol": msgpack.packb({"v": 2, "type": "stats", "secret": SECRET.decode()}),
    }
    assert isinstance(send(consumer.address, good)[1], wire.PoolStatus)
    bad_frames["replayed"] = good
    for what, frame in bad_frames.items():
        raw, reply = send(consumer.address, frame)
        assert reply == REFUSED, what
        assert control_auth.parse(raw)[4] == b"", f"{what}: a refusal is not signed"
        serves(consumer)


def test_producer_without_the_credential_learns_no_nixl_metadata_and_no_layout(consumer):
    for secret in (None, b"guess"):
        raw, reply = send(consumer.address, Credential("producer/p", secret).seal(
            wire.encode(hello("p", LAYOUT.model_copy(update={"block_size": 128}))))[0])
        assert reply == REFUSED
        assert b"kvb-consumer" not in raw and b"block_size" not in raw and b"128" not in raw
        p = producer("p", secret)
        try:
            with pytest.raises(PeerError) as e:
                p.link(consumer.address).ensure()
            assert e.value.code == "unauthenticated" and p.link(consumer.address).welcome is None
        finally:
            p.close()
    serves(consumer)


def test_spoofed_producer_id_cannot_end_or_renew_another_producers_lease(consumer):
    victim = producer("victim")
    try:
        grant = victim.link(consumer.address).alloc(TransferSpec("v-1", CHUNK, "ab" * 16), 5.0)
        assert isinstance(grant, wire.Grant)
        attacker = Credential("producer/attacker", SECRET)  # a real credential, but not the victim's
        rival = producer("rival")  # a real, handshaken producer asking for the victim's transfer: no takeover
        try:
            with pytest.raises(PeerError) as e:
                rival.link(consumer.address).alloc(TransferSpec("v-1", CHUNK, "ab" * 16, attempt=5), 5.0)
            assert e.value.code == "forbidden"
        finally:
            rival.close()
        for msg in (hello("victim", generation=2**62),
                    wire.Release(transfer_id="v-1", epoch=grant.epoch, reason="spoofed give-up"),
                    wire.Release(transfer_id="v-1", epoch=grant.epoch),
                    wire.Renew(transfer_id="v-1", epoch=grant.epoch, ttl_s=0.01),
                    wire.Cancel(transfer_id="v-1")):
            reply = call(consumer.address, attacker, msg)
            assert isinstance(reply, wire.Error) and reply.code == "forbidden", msg.type
        raw, reply = send(consumer.address, Credential("producer/victim", b"guess").seal(
            wire.encode(wire.Release(transfer_id="v-1", epoch=grant.epoch)))[0])
        assert reply == REFUSED
        lease = consumer.call("lease", "v-1")
        assert lease is not None and lease["epoch"] == grant.epoch, "the victim's lease survived"
        assert victim.link(consumer.address).release("v-1", grant.epoch), "its owner still ends it"
    finally:
        victim.close()


def test_another_producer_cannot_say_a_cancelled_lease_is_done_with_only_its_owner_can(consumer):
    """Once ended, a lease's slots rest until past its deadline unless its producer says it stopped writing: a
    rival saying so would let the owner's late writes land in slots handed to someone else."""
    victim = producer("victim-2")
    try:
        grant = victim.link(consumer.address).alloc(TransferSpec("v-2", CHUNK, "ab" * 16), 5.0)
        assert isinstance(call(consumer.address, Credential("router", SECRET), wire.Cancel(transfer_id="v-2")),
                          wire.Ack)
        assert consumer.call("lease", "v-2") is None
        reply = call(consumer.address, Credential("producer/attacker", SECRET),
                     wire.Release(transfer_id="v-2", epoch=grant.epoch))
        assert isinstance(reply, wire.Error) and reply.code == "forbidden"
        assert victim.link(consumer.address).release("v-2", grant.epoch) is False  # heard (ended already), not refused
    finally:
        victim.close()


def test_router_cancels_and_honest_producer_still_pushes(consumer):
    assert isinstance(call(consumer.address, Credential("router", SECRET), wire.Cancel(transfer_id="gone")), wire.Ack)
    p = producer("honest")
    try:
        spec = TransferSpec("h-1", CHUNK + 16, "ab" * 16)
        handle = p.begin(spec, consumer.address)
        for c in range(2):
            n = p.geometry.chunk_nbytes(spec.num_tokens, c)
            assert p.stage(handle, c, lambda v, n=n: v[:n].copy_(torch.randint(0, 256, (n,), dtype=torch.uint8))
                           .numel())
        done: list = []
        wait_for(lambda: done.extend(p.take_finished()) or done, 10, 0.01, "push finished")
        assert done[0].state == State.SENT
        assert consumer.call("release", "h-1")
    finally:
        p.close()


def test_routable_listener_without_a_secret_refuses_to_start(caplog):
    with pytest.raises(CredentialError, match="would listen on 0.0.0.0 without a secret.*KVBRIDGE_SECRET"):
        ConsumerEndpoint(LAYOUT, ConsumerSettings(chunk_tokens=CHUNK, num_slots=2, host="0.0.0.0"))
    ep = ConsumerEndpoint(LAYOUT, ConsumerSettings(chunk_tokens=CHUNK, num_slots=2, host="0.0.0.0", insecure=True))
    try:
        assert any("INSECURE" in r.getMessage() for r in caplog.records)
    finally:
        ep.close()

"""How late a cut link's held write can land (transfer/write_hold.py), and the producer telling its consumer so:
the consumer rests an unanswered lease's slots at least that long."""
from __future__ import annotations

import logging

import pytest

from launch.polling import wait_for
from tests.test_transfer import CHUNK_TOKENS, LAYOUT, finished, make_producer, push
from transfer import wire
from transfer.consumer_endpoint import ConsumerEndpoint
from transfer.consumer_settings import ConsumerSettings
from transfer.states import State
from tests.test_bounded_state import FakeAgent
from transfer.producer_registry import ProducerRegistry
from transfer.slot_pool import SlotPool
from transfer.write_hold import (held_rest, host_facts, local_tcp_retries2, retries2_within, tcp_give_up_s,
                                 write_hold_s)


def test_the_give_up_span_doubles_from_200_ms_then_grows_by_120_s_as_linux_models_it():
    assert tcp_give_up_s(0) == pytest.approx(0.2)
    assert tcp_give_up_s(3) == pytest.approx(3.0)  # 0.2 + 0.4 + 0.8 + 1.6
    assert tcp_give_up_s(9) == pytest.approx(204.6)  # the last doubling: 102.4 s < 120 s
    assert tcp_give_up_s(10) == pytest.approx(324.6)
    assert tcp_give_up_s(15) == pytest.approx(924.6)  # Linux's default: about 15.4 minutes


def test_the_hold_adds_one_backoff_and_three_timeouts_of_a_1_s_rto_to_the_span():
    assert write_hold_s(3) == pytest.approx(3.0 + 3.0 + 3.0)  # the next doubling could come as late as the span
    assert write_hold_s(15) == pytest.approx(924.6 + 120.0 + 3.0)  # past the doublings, 120 s apart


def test_the_largest_retries_that_fit_a_rest_are_named():
    assert retries2_within(30.0) == 5 and write_hold_s(5) <= 30.0 < write_hold_s(6)
    assert retries2_within(1047.6) == 15
    assert retries2_within(0.5) is None


def test_a_longer_rest_is_told_with_the_setting_that_would_shorten_it():
    said = held_rest("prefill-0/rank0", 15, 30.0)
    assert "prefill-0/rank0" in said and "rest 1048 s" in said and "net.ipv4.tcp_retries2=15" in said
    assert "<= 5 brings it within fence_timeout_s, 30 s" in said
    assert "brings it within" not in held_rest("prefill-0/rank0", 15, 0.5)


def test_this_hosts_setting_is_read_from_proc():
    with open("/proc/sys/net/ipv4/tcp_retries2") as f:
        assert local_tcp_retries2() == int(f.read())


def test_a_producer_says_which_kernel_it_runs_on():
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert host_facts() == {"tcp_retries2": local_tcp_retries2(), "boot_id": f.read().strip()}


@pytest.mark.parametrize("boot_id,rest", [("boot-a", 122.0), ("boot-b", 1000.0)], ids=["same_kernel", "another"])
def test_a_restart_from_another_kernel_leaves_the_old_leases_their_full_rest(boot_id, rest):
    """A restart shows the old connection's link is back only when the new generation runs on the old one's
    kernel; a pod rescheduled to another node under the same name shows nothing of it."""
    now = [0.0]
    pool = SlotPool(2, 1024, quarantine_s=2.0, fence_timeout_s=30.0, clock=lambda: now[0])
    reg = ProducerRegistry(FakeAgent(), pool, clock=lambda: now[0])

    def hello(generation: int, boot: str) -> wire.Hello:
        return wire.Hello(producer_id="p", generation=generation, incarnation=f"inc-{generation}", layout=LAYOUT,
                          chunk_tokens=CHUNK_TOKENS, agent_name=f"a{generation}", agent_meta=b"a%d" % generation,
                          boot_id=boot)
    assert reg.hello(hello(1, "boot-a"), write_hold_s=1000.0) == ""
    assert pool.grant("t", [1024], 1.0, "inc-1", write_hold_s=reg.write_hold_of("inc-1")) is not None
    now[0] = 5.0
    assert reg.hello(hello(2, boot_id), write_hold_s=1000.0) == ""
    now[0] = 5.0 + rest - 0.1
    assert pool.stats().quarantined == 1
    now[0] = 5.0 + rest + 0.1
    assert pool.stats().free == 2


def test_a_hello_carries_the_setting_and_rejects_one_out_of_range():
    from transfer.nixl_agent import NixlAgent
    agent = NixlAgent("hold-hello")
    hello = wire.Hello(producer_id="p", generation=1, incarnation="i", layout=LAYOUT, chunk_tokens=CHUNK_TOKENS,
                       agent_name=agent.name, agent_meta=agent.metadata(), tcp_retries2=7)
    assert wire.decode_request(wire.encode(hello)).tcp_retries2 == 7
    with pytest.raises(wire.WireError):
        wire.decode_request(wire.encode(hello.model_copy(update={"tcp_retries2": 1000})))


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"], ids=["loopback", "routable"])
def test_a_lease_keeps_the_hold_its_producers_hello_gave_unless_the_consumer_listens_on_loopback_only(
        caplog, monkeypatch, host):
    """A consumer reachable from other hosts reckons each producer's hold from its hello's tcp_retries2 and says so
    when that outlasts fence_timeout_s; one on loopback only has producers on its own host: no link to cut."""
    caplog.set_level(logging.INFO, logger="kvbridge.consumer")
    monkeypatch.setattr("transfer.write_hold.local_tcp_retries2", lambda: 7)  # not the wire's default, 15
    hold = write_hold_s(7) if host == "0.0.0.0" else 0.0
    ep = ConsumerEndpoint(LAYOUT, ConsumerSettings(chunk_tokens=CHUNK_TOKENS, num_slots=4, host=host, insecure=True,
                                                   fence_timeout_s=30.0))
    p = make_producer("hold-p")
    try:
        push(p, ep, "hold-t", 1)
        assert finished(p, {"hold-t"})["hold-t"] == State.SENT  # the handshake went through
        lease = wait_for(lambda: (x := ep.pool.live("hold-t")) is not None and x.complete and x, 5, 0.01,
                         "the chunk landed")
        assert lease.write_hold_s == pytest.approx(hold)
        said = [r.getMessage() for r in caplog.records if "tcp_retries2" in r.getMessage()]
        assert bool(said) == (hold > 30.0), said
        if said:
            assert "net.ipv4.tcp_retries2=7" in said[0] and "producer hold-p" in said[0]
        assert ep.pool.release("hold-t")
        assert p.staging.free == p.staging.num_slots and ep.pool.stats().free == ep.pool.num_slots
    finally:
        p.close()
        ep.close()

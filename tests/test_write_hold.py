"""How late a cut link's held write can land (transfer/write_hold.py), and the producer telling its consumer so:
the consumer warns when it would give an unanswered lease's slots back sooner."""
from __future__ import annotations

import pytest

from launch.polling import wait_for
from tests.test_transfer import CHUNK_TOKENS, LAYOUT, finished, make_producer, push
from transfer import wire
from transfer.consumer_endpoint import ConsumerEndpoint
from transfer.consumer_settings import ConsumerSettings
from transfer.states import State
from transfer.write_hold import hold_warning, local_tcp_retries2, retries2_within, tcp_give_up_s, write_hold_s


def test_the_give_up_span_doubles_from_200_ms_then_grows_by_120_s_as_linux_models_it():
    assert tcp_give_up_s(0) == pytest.approx(0.2)
    assert tcp_give_up_s(3) == pytest.approx(3.0)  # 0.2 + 0.4 + 0.8 + 1.6
    assert tcp_give_up_s(9) == pytest.approx(204.6)  # the last doubling: 102.4 s < 120 s
    assert tcp_give_up_s(10) == pytest.approx(324.6)
    assert tcp_give_up_s(15) == pytest.approx(924.6)  # Linux's default: about 15.4 minutes


def test_a_held_write_may_land_one_backoff_past_the_span():
    assert write_hold_s(3) == pytest.approx(tcp_give_up_s(4)) == pytest.approx(6.2)
    assert write_hold_s(15) == pytest.approx(1044.6)


def test_the_largest_retries_that_fit_a_rest_are_named():
    assert retries2_within(30.0) == 5 and write_hold_s(5) <= 30.0 < write_hold_s(6)
    assert retries2_within(1044.6) == 15
    assert retries2_within(0.5) is None


def test_a_rest_shorter_than_the_producers_hold_is_warned_about_with_both_fixes():
    said = hold_warning("prefill-0", 15, 30.0)
    assert said is not None and "prefill-0" in said and "tcp_retries2=15" in said
    assert "fence_timeout_s >= 1045" in said and "tcp_retries2 <= 5 on that host" in said
    assert hold_warning("prefill-0", 5, 30.0) is None
    assert hold_warning("prefill-0", 15, 1044.6) is None
    assert "on that host" not in hold_warning("prefill-0", 2, 0.5)


def test_this_hosts_setting_is_read_from_proc():
    with open("/proc/sys/net/ipv4/tcp_retries2") as f:
        assert local_tcp_retries2() == int(f.read())


def test_a_hello_carries_the_setting_and_rejects_one_out_of_range():
    from transfer.nixl_agent import NixlAgent
    agent = NixlAgent("hold-hello")
    hello = wire.Hello(producer_id="p", generation=1, incarnation="i", layout=LAYOUT, chunk_tokens=CHUNK_TOKENS,
                       agent_name=agent.name, agent_meta=agent.metadata(), tcp_retries2=7)
    assert wire.decode_request(wire.encode(hello)).tcp_retries2 == 7
    with pytest.raises(wire.WireError):
        wire.decode_request(wire.encode(hello.model_copy(update={"tcp_retries2": 1000})))


@pytest.mark.parametrize("fence_timeout_s,warned", [(30.0, True), (None, False)], ids=["short_rest", "long_rest"])
def test_a_producers_hello_tells_the_consumer_its_hold_and_a_short_rest_is_warned(caplog, fence_timeout_s, warned):
    hold = write_hold_s(local_tcp_retries2())
    rest = fence_timeout_s if fence_timeout_s is not None else hold
    ep = ConsumerEndpoint(LAYOUT, ConsumerSettings(chunk_tokens=CHUNK_TOKENS, num_slots=4, fence_timeout_s=rest))
    p = make_producer("hold-p")
    try:
        push(p, ep, "hold-t", 1)
        assert finished(p, {"hold-t"})["hold-t"] == State.SENT  # the handshake went through
        said = [r.getMessage() for r in caplog.records if "tcp_retries2" in r.getMessage()]
        assert bool(said) == (warned and hold > rest), said
        if said:
            assert f"net.ipv4.tcp_retries2={local_tcp_retries2()}" in said[0] and "producer hold-p" in said[0]
        wait_for(lambda: ep.pool.live("hold-t") is not None and ep.pool.live("hold-t").complete, 5, 0.01,
                 "the chunk landed")
        assert ep.pool.release("hold-t")
        assert p.staging.free == p.staging.num_slots and ep.pool.stats().free == ep.pool.num_slots
    finally:
        p.close()
        ep.close()

"""How long a decode request waits for a producer it never heard from once the router said the prefill node
answered (transfer/producer_registry.py, `no_show_s`): the short wait, unless a producer was admitted so recently
that its first handshake — after which its ALLOCs go out — may still be under way, or the prefill node that answered
is one the router first named to this consumer so recently that its producer may not have greeted it yet
(transfer/answered_notices.py)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from tests.test_bounded_state import FakeAgent, hello
from transfer import wire
from transfer.answered_notices import AnsweredNotices
from transfer.producer_registry import ProducerRegistry
from transfer.slot_pool import SlotPool


def registry(now: list[float]) -> ProducerRegistry:
    return ProducerRegistry(FakeAgent(), SlotPool(4, 1024, 0.0), clock=lambda: now[0])


def test_with_no_producer_admitted_lately_the_short_wait_applies():
    now = [100.0]
    assert registry(now).no_show_s(0.25, 4.0) == 0.25


def test_the_longer_wait_applies_while_a_new_producer_may_still_be_shaking_hands():
    now = [100.0]
    reg = registry(now)
    assert reg.hello(hello("p1")) == ""
    now[0] = 103.9
    assert reg.no_show_s(0.25, 4.0) == 4.0
    now[0] = 104.1
    assert reg.no_show_s(0.25, 4.0) == 0.25


def test_a_repeated_or_refused_hello_is_no_new_handshake():
    now = [100.0]
    reg = registry(now)
    assert reg.hello(hello("p1")) == ""
    now[0] = 110.0
    assert reg.hello(hello("p1")) == ""  # the same incarnation greets again: nothing new to set up
    older = wire.Hello(**dict(hello("p1").model_dump(), generation=0, incarnation="inc-old"))
    assert "not newer" in reg.hello(older)
    assert reg.no_show_s(0.25, 4.0) == 0.25


def test_a_short_handshake_grace_never_shortens_the_wait():
    now = [100.0]
    reg = registry(now)
    assert reg.hello(hello("p1")) == ""
    assert reg.no_show_s(3.0, 1.0) == 3.0


def notices(now: list[float]) -> AnsweredNotices:
    return AnsweredNotices(first_contact_s=4.0, remember_s=60.0, max_keys=100, clock=lambda: now[0])


def test_answers_from_a_prefill_node_first_named_lately_are_a_first_contact_then_no_longer():
    now = [100.0]
    n = notices(now)
    n.record("t1", ago_s=0.1, prefill="prefill-0#0")
    now[0] = 103.5
    n.record("t2", ago_s=0.1, prefill="prefill-0#0")  # answered 3.5 s after the first: its handshake may still run
    now[0] = 104.5
    n.record("t3", ago_s=0.1, prefill="prefill-0#0")  # 4.5 s after: a producer that met us would have said so
    assert n.at("t1") == (99.9, True) and n.at("t2") == (103.4, True) and n.at("t3") == (104.4, False)
    assert n.at("t3/abcd") == (104.4, False), "a per-prompt key reads its transfer's notice"


def test_each_prefill_node_and_each_up_period_of_one_has_its_own_first_contact():
    now = [100.0]
    n = notices(now)
    n.record("t1", prefill="prefill-0#0")
    now[0] = 110.0
    n.record("t2", prefill="prefill-0#0")
    n.record("t3", prefill="prefill-1#0")  # another node
    n.record("t4", prefill="prefill-0#1")  # the first node back from down: maybe a new process
    assert [n.at(t)[1] for t in ("t1", "t2", "t3", "t4")] == [True, False, True, True]


def test_a_notice_naming_no_prefill_node_is_never_a_first_contact():
    """A router that does not name the node (or a test playing one) gets the short wait, as before."""
    now = [100.0]
    n = notices(now)
    n.record("t1")
    assert n.at("t1") == (100.0, False) and n.at("never-said") == (0.0, False)


def test_at_the_bound_the_prefill_node_least_recently_named_is_forgotten_not_one_still_answering():
    now = [100.0]
    n = AnsweredNotices(first_contact_s=4.0, remember_s=60.0, max_keys=100, max_nodes=2, clock=lambda: now[0])
    n.record("t1", prefill="a#1.0")
    n.record("t2", prefill="b#1.0")
    now[0] = 110.0
    n.record("t3", prefill="a#1.0")  # a answers again: b is now the least recently named
    n.record("t4", prefill="c#1.0")  # at the bound: b goes
    n.record("t5", prefill="a#1.0")
    n.record("t6", prefill="b#1.0")
    assert [n.at(t)[1] for t in ("t3", "t4", "t5", "t6")] == [False, True, False, True]


def test_the_wire_refuses_a_prefill_node_name_longer_than_256_characters():
    assert wire.PrefillAnswered(transfer_id="t", prefill="p" * 256).prefill == "p" * 256
    with pytest.raises(ValidationError):
        wire.PrefillAnswered(transfer_id="t", prefill="p" * 257)

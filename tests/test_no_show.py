"""How long a decode request waits for a producer it never heard from once the router said the prefill node
answered (transfer/producer_registry.py, `no_show_s`): the short wait, unless a producer was admitted so recently
that its first handshake — after which its ALLOCs go out — may still be under way."""
from __future__ import annotations

from tests.test_bounded_state import FakeAgent, hello
from transfer import wire
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

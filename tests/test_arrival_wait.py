"""The decode's idle wait for chunks: a chunk that lands between the worker's look at its transfers and
its wait must end the wait at once (before, the wait slept its whole timeout — 20 ms per idle step —
whenever the pump's wake-up came between the two)."""
from __future__ import annotations

import threading
import time

import pytest

from tests.test_transfer import CHUNK_TOKENS, LAYOUT
from transfer.consumer_endpoint import ConsumerEndpoint
from transfer.consumer_settings import ConsumerSettings


@pytest.fixture
def endpoint():
    ep = ConsumerEndpoint(LAYOUT, ConsumerSettings(chunk_tokens=CHUNK_TOKENS, num_slots=2))
    yield ep
    ep.close()


def pump_batch(ep: ConsumerEndpoint) -> None:
    """What the endpoint's pump does after a batch of chunk notices (its wake-up under the condition)."""
    with ep._arrived:
        ep.arrivals += 1
        ep._arrived.notify_all()


def test_a_chunk_that_landed_after_the_look_ends_the_wait_at_once(endpoint):
    seen = endpoint.arrivals   # the worker reads this, then looks at its transfers...
    pump_batch(endpoint)       # ...a chunk lands (its wake-up goes to nobody)...
    assert endpoint.wait_arrivals(60.0, seen) is True  # ...and the wait returns at once, not after 60 s


def test_without_a_new_chunk_the_wait_times_out(endpoint):
    assert endpoint.wait_arrivals(0.01, endpoint.arrivals) is False
    assert endpoint.wait_arrivals(0.01) is False


def test_a_chunk_landing_during_the_wait_wakes_it(endpoint):
    timer = threading.Timer(0.05, pump_batch, (endpoint,))
    timer.start()
    try:
        assert endpoint.wait_arrivals(60.0) is True
    finally:
        timer.join()


def test_the_wait_tells_the_pump_the_engine_sits_idle_for_as_long_as_it_waits_and_no_longer(endpoint):
    """poll_pace.py hurries the pump for a transfer under way only while the engine waits idle: through the
    wait, and once a chunk ended it (the engine then steps, and would wait again within a lease_poll_s
    if still idle) for at most lease_poll_s."""
    during = []
    timer = threading.Timer(0.05, lambda: (during.append(endpoint.awaited_until), pump_batch(endpoint)))
    t0 = time.monotonic()
    timer.start()
    try:
        assert endpoint.wait_arrivals(60.0) is True
    finally:
        timer.join()
    assert during[0] >= t0 + 60.0
    assert endpoint.awaited_until <= time.monotonic() + endpoint.cfg.lease_poll_s

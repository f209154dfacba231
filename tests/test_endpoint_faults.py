"""The consumer endpoint's one thread serves every lease and notice of its node: a fault in what it calls
(NIXL, a sender's check) is logged, counted and survived, never the end of the service."""
from __future__ import annotations

import pytest

from launch.polling import wait_for
from tests.test_consumer_auth import call
from tests.test_transfer import CHUNK_TOKENS, LAYOUT
from transfer import consumer_endpoint, wire
from transfer.consumer_endpoint import ConsumerEndpoint
from transfer.consumer_settings import ConsumerSettings
from transfer.control_auth import Credential
from transfer.notice import ChunkNotice

ROUTER = Credential("router", None)


@pytest.fixture
def endpoint():
    ep = ConsumerEndpoint(LAYOUT, ConsumerSettings(chunk_tokens=CHUNK_TOKENS, num_slots=2))
    yield ep
    ep.close()


def fails_once(real):
    calls = []

    def call_it(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real(*args)
    return call_it


def test_a_fault_while_pumping_notifications_is_counted_and_the_endpoint_serves_on(endpoint):
    endpoint.agent.notifications = fails_once(endpoint.agent.notifications)
    wait_for(lambda: endpoint.book.snapshot().get("endpoint_loop_errors") == 1, 5, 0.01, "the fault counted")
    assert isinstance(call(endpoint.address, ROUTER, wire.Stats()), wire.PoolStatus)


def test_a_fault_in_the_senders_check_answers_that_request_with_an_error_and_serves_on(endpoint, monkeypatch):
    monkeypatch.setattr(consumer_endpoint, "forbidden", fails_once(consumer_endpoint.forbidden))
    reply = call(endpoint.address, ROUTER, wire.Stats())
    assert isinstance(reply, wire.Error) and reply.code == "internal" and "injected fault" in reply.message
    assert isinstance(call(endpoint.address, ROUTER, wire.Stats()), wire.PoolStatus)


def test_a_fault_on_one_chunk_notice_leaves_the_rest_of_its_batch_read(endpoint):
    """Two notices in one batch from NIXL, the first one's handling faults: the second is still read (here
    dropped and counted, as no lease names it), and the fault is counted as that notice's."""
    batch = [ChunkNotice(transfer_id=f"t-{i}", chunk=0, epoch=1, incarnation="p", nbytes=8).encode() for i in (1, 2)]
    pending = [{"producer": batch}]
    endpoint.pool.accept = fails_once(endpoint.pool.accept)
    endpoint.agent.notifications = lambda: pending.pop() if pending else {}
    wait_for(lambda: endpoint.book.snapshot().get("notice_errors") == 1, 5, 0.01, "the fault counted")
    wait_for(lambda: endpoint.pool.stats().dropped_total == 1, 5, 0.01, "the second notice read")
    assert endpoint.book.snapshot().get("endpoint_loop_errors") is None

"""A link's connection events are read, so an unreachable consumer never wedges the process's ZMQ.

ZMQ's I/O thread writes every connection event of a monitored socket into its monitor and blocks once
about a thousand are unread; with it, every socket of that context stops moving. A producer keeps a link
to each consumer it ever used, and one that became unreachable is retried for as long as the link lives.
"""
from __future__ import annotations

import time

import pytest

from launch.local_servers import free_port
from tests.consumer_proc import ConsumerProcess
from tests.test_transfer import CHUNK_TOKENS, LAYOUT, check_landed, finished, make_producer, push
from transfer import consumer_link
from transfer.states import State


@pytest.fixture
def fast_retries(monkeypatch):
    """Retries every 1 ms: a hundred or more events a second (as fast as this machine refuses
    connections), a wedge within ~10 s unless they are read."""
    monkeypatch.setattr(consumer_link, "RECONNECT_IVL_MS", 1)


def test_an_unreachable_consumer_retried_for_long_does_not_stop_pushes_to_another(fast_retries, failure_report):
    p = make_producer("keeps-moving")
    consumer = ConsumerProcess(LAYOUT, chunk_tokens=CHUNK_TOKENS, num_slots=4)
    try:
        dead = f"127.0.0.1:{free_port()}"  # nobody listens there
        p.announcer.announce("nobody-1", dead)  # opens a link to it, as a queued request would
        p.announcer.announce("nobody-2", dead)
        time.sleep(12)  # thousands of connection attempts
        crcs = push(p, consumer, "alive-1", 2)
        assert finished(p, {"alive-1"})["alive-1"] == State.SENT
        check_landed(consumer, "alive-1", crcs)
        assert consumer.call("stats").free == 4
        failure_report("a consumer unreachable for long (its link retried every 1 ms for 12 s)",
                       "a push to another consumer afterwards SENT, bytes equal", None, None,
                       "none: consumer pool full")
    finally:
        consumer.stop()
        p.close()


def test_an_idle_link_closes_its_socket_and_the_next_call_opens_one():
    consumer = ConsumerProcess(LAYOUT, chunk_tokens=CHUNK_TOKENS, num_slots=4, port=free_port())
    p = make_producer("idle")
    try:
        link = p.link(consumer.address)
        link.ensure()
        link.tend(idle_close_s=60)
        assert link._sock is not None  # used moments ago: kept
        link.tend(idle_close_s=0)
        assert link._sock is None
        assert link.pending("after-idle")  # a new socket, the same consumer
    finally:
        p.close()
        consumer.stop()

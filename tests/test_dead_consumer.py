"""A consumer killed (-9), or frozen, while a producer holds leases on it (issue 13, "no hang on a dead node").

Real NIXL between processes. The producer must notice the dead consumer from its connection (a frozen one
from one unanswered call), fail every transfer it had there at once (not one RPC timeout after another on
its single push thread), give its staging back, and keep pushing to a healthy consumer meanwhile; a
consumer restarted on the same address, or woken up, is used again. The tests with a healthy consumer run
with either UCX error handling on every agent (transfer/ucx_error_handling.py): the control link finds a dead or
frozen consumer out the same way in both (a write to a dead one: tests/test_ucx_error_handling.py)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from launch.local_servers import free_port
from launch.polling import wait_for
from transfer.states import State
from tests.consumer_proc import ConsumerProcess
from tests.test_transfer import CHUNK_TOKENS, LAYOUT, check_landed, finished, make_producer, push, spec

DOOMED = 8
LEASE_TTL_S = 3.0
RPC_TIMEOUT_S = 2.0  # ProducerSettings' default


@pytest.fixture(params=["peer", "none"])
def ucx(request) -> str:
    """UCX's error handling for every agent of the test."""
    return request.param


@pytest.fixture
def healthy(ucx):
    c = ConsumerProcess(LAYOUT, chunk_tokens=CHUNK_TOKENS, num_slots=8, quarantine_s=0.3, ucx_error_handling=ucx)
    yield c
    c.stop()


def test_transfers_to_a_killed_consumer_fail_at_once_and_free_staging(healthy, ucx):
    port = free_port()
    doomed = ConsumerProcess(LAYOUT, chunk_tokens=CHUNK_TOKENS, num_slots=3 * DOOMED, port=port, ucx_error_handling=ucx)
    p = make_producer("bereaved", lease_ttl_s=LEASE_TTL_S, staging_chunks=16, ucx_error_handling=ucx)
    assert p.agent.error_handling == ucx
    try:
        keys = lease_some(p, doomed, "dead")
        doomed.kill()
        killed = time.monotonic()
        crcs = push(p, healthy, "alive-1", 2)  # pushed while the push thread learns the other is gone
        states = finished(p, set(keys) | {"alive-1"})
        detected = time.monotonic() - killed
        assert {states[k] for k in keys} == {State.FAILED} and states["alive-1"] == State.SENT, states
        check_landed(healthy, "alive-1", crcs)
        # Learnt from the connection, not from leases running out one RPC timeout after another.
        assert detected < LEASE_TTL_S, detected
        wait_for(lambda: p.staging.free == p.staging.num_slots, LEASE_TTL_S, 0.01, "staging back to full")
        assert not p._jobs

        back = ConsumerProcess(LAYOUT, chunk_tokens=CHUNK_TOKENS, num_slots=4, port=port, ucx_error_handling=ucx)
        try:  # the same address restarted: the producer reconnects and pushes there again
            crcs = push(p, back, "reborn-1", 2)
            assert finished(p, {"reborn-1"})["reborn-1"] == State.SENT
            check_landed(back, "reborn-1", crcs)
        finally:
            back.stop()
    finally:
        doomed.kill()
        p.close()


def delivered(p, consumer: ConsumerProcess, key: str) -> None:
    """A 2-chunk push of `key` is SENT and lands byte for byte."""
    crcs = push(p, consumer, key, 2)
    assert finished(p, {key})[key] == State.SENT
    check_landed(consumer, key, crcs)


def lease_some(p, consumer: ConsumerProcess, prefix: str) -> list[str]:
    """DOOMED transfers of 3 chunks each with one staged (the rest would follow as prefill goes on), leased."""
    keys = [f"{prefix}-{i}" for i in range(DOOMED)]
    for key in keys:
        handle = p.begin(spec(key, 3), consumer.address)
        assert p.stage(handle, 0, lambda v: p.geometry.chunk_nbytes(spec(key, 3).num_tokens, 0))
    wait_for(lambda: all(consumer.call("lease", k) for k in keys), 15, 0.01, "every lease granted")
    return keys


def test_transfers_to_a_frozen_consumer_fail_after_one_unanswered_call(healthy, ucx):
    frozen = ConsumerProcess(LAYOUT, chunk_tokens=CHUNK_TOKENS, num_slots=3 * DOOMED, ucx_error_handling=ucx)
    p = make_producer("patient", lease_ttl_s=LEASE_TTL_S, staging_chunks=16, ucx_error_handling=ucx)
    try:
        keys = lease_some(p, frozen, "frozen")
        os.kill(frozen.proc.pid, signal.SIGSTOP)  # connection open, nobody answers: a swapping or stuck node
        stopped = time.monotonic()
        crcs = push(p, healthy, "alive-2", 2)
        states = finished(p, set(keys) | {"alive-2"})
        detected = time.monotonic() - stopped
        assert {states[k] for k in keys} == {State.FAILED} and states["alive-2"] == State.SENT, states
        check_landed(healthy, "alive-2", crcs)
        # one renewal's timeout, not DOOMED of them in turn (that took DOOMED x RPC_TIMEOUT_S)
        assert detected < LEASE_TTL_S / 3 + 2 * RPC_TIMEOUT_S, detected
        wait_for(lambda: p.staging.free == p.staging.num_slots, LEASE_TTL_S, 0.01, "staging back to full")
        os.kill(frozen.proc.pid, signal.SIGCONT)
        time.sleep(RPC_TIMEOUT_S)  # past the span in which calls fail at once: the next one asks again
        # the failed pushes' fences free their slots; without them they would rest fence_timeout_s (30 s)
        assert frozen.call("counters").get("fences_received") == DOOMED
        delivered(p, frozen, "thawed-1")
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
        frozen.stop()
        p.close()


def test_an_alloc_a_frozen_consumer_takes_in_late_is_withdrawn_and_holds_no_slots():
    """The ALLOC waits in the frozen consumer's socket past the producer's call timeout, and the producer gives
    the transfer up; woken, the consumer would lease slots to nobody until fence_timeout_s past the lease's
    deadline. The producer withdraws the ALLOC once the consumer answers: its slots rest quarantine_s."""
    frozen = ConsumerProcess(LAYOUT, chunk_tokens=CHUNK_TOKENS, num_slots=4, quarantine_s=0.3, fence_timeout_s=60.0)
    p = make_producer("late-alloc", lease_ttl_s=LEASE_TTL_S, staging_chunks=4)
    try:
        delivered(p, frozen, "before")  # handshaken: a push after this one's first call is its ALLOC
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        handle = p.begin(spec("late", 2), frozen.address)
        assert p.stage(handle, 0, lambda v: p.geometry.chunk_nbytes(spec("late", 2).num_tokens, 0))
        assert finished(p, {"late"})["late"] == State.FAILED  # its ALLOC's call timed out
        os.kill(frozen.proc.pid, signal.SIGCONT)
        time.sleep(RPC_TIMEOUT_S)  # past the span in which calls fail at once
        frozen.wait_pool_full(timeout_s=15)  # without the withdrawal: LEASE_TTL_S + 60 s
        counters = frozen.call("counters")
        # the ALLOC came first and its lease ended, or the withdrawal came first and the ALLOC was refused
        assert counters.get("allocs_withdrawn", 0) + counters.get("allocs_refused_withdrawn", 0) == 1, counters
        delivered(p, frozen, "after-late")  # and the consumer serves this producer as before
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
        frozen.stop()
        p.close()


def test_a_frozen_consumer_does_not_hold_pushes_to_another(healthy, ucx):
    """Calls to each consumer run on a thread of their own: an ALLOC that a frozen consumer leaves unanswered
    (here for as long as the long RPC timeout) does not stop a healthy consumer's transfer from completing;
    the lease it grants once it wakes is released at once, its transfer having been aborted meanwhile."""
    frozen = ConsumerProcess(LAYOUT, chunk_tokens=CHUNK_TOKENS, num_slots=4, quarantine_s=0.1, ucx_error_handling=ucx)
    p = make_producer("unhindered", lease_ttl_s=60.0, staging_chunks=16, rpc_timeout_s=60.0, ucx_error_handling=ucx)
    try:
        p.link(frozen.address).ensure()  # met before it froze: the next call is a plain ALLOC
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        stuck = p.begin(spec("stuck-1", 2), frozen.address)
        wait_for(lambda: p._jobs[stuck].call is not None, 15, 0.01, "the ALLOC to the frozen consumer sent")
        crcs = push(p, healthy, "alive-3", 2)
        assert finished(p, {"alive-3"})["alive-3"] == State.SENT
        check_landed(healthy, "alive-3", crcs)
        assert p._jobs[stuck].t.state == State.ALLOCATING and not p._jobs[stuck].call.done(), \
            "the healthy consumer's transfer finished while the frozen one's ALLOC still waits"
        p.abort(stuck)
        os.kill(frozen.proc.pid, signal.SIGCONT)
        assert finished(p, {"stuck-1"})["stuck-1"] == State.ABORTED
        stats = frozen.call("stats")
        assert stats.used == 0 and stats.expired_total == 0, f"the late lease is released, not left to expire: {stats}"
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
        frozen.stop()
        p.close()

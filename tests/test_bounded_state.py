"""The consumer's per-peer state is bounded and expires: producers and their NIXL remote agents,
remembered cancels and failures, traces, and the control plane's seen-nonce table."""
from __future__ import annotations

import pytest

from transfer import wire
from transfer.ended_keys import EndedKeys
from transfer.layout import KVLayout
from transfer.notice import ChunkNotice
from transfer.producer_registry import ProducerRegistry
from transfer.receive_book import DELIVERED, Arrival, ReceiveBook
from transfer.slot_pool import SlotPool

LAYOUT = KVLayout(model_id="m", num_layers=2, num_kv_heads=2, kv_heads_per_rank=2, head_size=32, dtype="float32",
                  block_size=16, cache_layout="LBHNC")


class FakeAgent:
    """Records the remote agents the registry adds and removes (NIXL itself is tested elsewhere)."""

    def __init__(self) -> None:
        self.remotes: set[str] = set()

    def add_remote(self, meta: bytes) -> str:
        self.remotes.add(meta.decode())
        return meta.decode()

    def remove_remote(self, name: str) -> None:
        self.remotes.discard(name)


def hello(pid: str) -> wire.Hello:
    return wire.Hello(producer_id=pid, generation=1, incarnation=f"inc-{pid}", layout=LAYOUT, chunk_tokens=64,
                      agent_name=pid, agent_meta=pid.encode())


def test_producer_table_and_remote_agents_are_bounded_and_expire():
    now = [0.0]
    agent, pool = FakeAgent(), SlotPool(4, 1024, 0.0)
    reg = ProducerRegistry(agent, pool, max_producers=8, idle_s=60, clock=lambda: now[0])
    for i in range(20):
        assert reg.hello(hello(f"p{i}")) == ""
    assert len(reg) == 8 and agent.remotes == {f"p{i}" for i in range(12, 20)}
    assert reg.owner("inc-p3") is None and reg.owner("inc-p19") == "p19"
    assert pool.grant("t", [1024], 600, "inc-p19", 0) is not None
    now[0] = 30.0
    reg.touch("p19")  # p19 speaks; the others stay silent
    now[0] = 61.0
    reg.touch("p19")
    assert len(reg) == 1 and agent.remotes == {"p19"} and pool.live("t") is not None
    now[0] = 200.0
    reg.touch("nobody")
    assert len(reg) == 0 and agent.remotes == set() and pool.live("t") is None, "its leases end with it"


def test_remembered_cancels_and_traces_are_bounded():
    book = ReceiveBook(SlotPool(2, 1024, 0.0), 30.0, keep_traces=10, max_ended=100)
    for i in range(5000):
        book.discard(f"cancel-{i}")
        book.finish(f"k-{i}", None, {"state": "ABORTED", "reason": "", "ms": {}})
    assert len(book._ended) <= 100 and len(book._traces) <= 10
    assert book.status("cancel-4999")[1].startswith("cancelled"), "the newest are the ones remembered"


def test_a_transfer_ended_again_after_its_memory_expired_is_remembered_again():
    now = [0.0]
    book = ReceiveBook(SlotPool(2, 1024, 0.0), 30.0, remember_s=60, clock=lambda: now[0])
    book.fail("k", "first")
    book.fail("k", "second")
    assert book.status("k")[1] == "first", "the first reason stands while it is remembered"
    now[0] = 61.0
    assert book.status("k")[0].value == "WAITING"
    book.discard("k")
    assert book.status("k")[1].startswith("cancelled")


def test_signs_of_life_and_answered_notices_are_bounded_newest_kept():
    """A router (or producer) flood of notices for transfers no request expects cannot grow the book."""
    now = [0.0]
    book = ReceiveBook(SlotPool(2, 1024, 0.0), 30.0, remember_s=60, clock=lambda: now[0], max_ended=100)
    for i in range(5000):
        now[0] = i * 1e-3  # all within remember_s: the oldest give way
        book.answered.record(f"t-{i}", prefill=f"prefill-{i}")
        book.sign_of_life(f"k-{i}")
    assert len(book.answered) <= 100 and len(book.answered._first_named) <= 1024 and len(book._signs) <= 100
    assert book.answered.at("t-4999")[0] == 4.999 and book.last_sign("k-4999") == 4.999
    assert book.answered.at("t-0")[0] == 0.0 and book.last_sign("k-0") == 0.0


def test_an_alloc_that_came_before_its_request_is_a_sign_of_life():
    """Such a producer reached the consumer: the router's 'prefill answered' must not make it a no-show."""
    now = [5.0]
    book = ReceiveBook(SlotPool(2, 1024, 0.0), 30.0, clock=lambda: now[0])
    book.answered.record("t")
    now[0] = 6.0
    assert book.alloc_waits("t", 0.05) and book.last_sign("t") == 6.0 > book.answered.at("t")[0] == 5.0


def test_a_notice_sent_late_is_dated_back_to_the_prefill_answer():
    """The router sends its notice a moment after the prefill answered: a producer heard from in between showed
    life after the answer, and is no no-show."""
    now = [5.0]
    book = ReceiveBook(SlotPool(2, 1024, 0.0), 30.0, clock=lambda: now[0])
    book.sign_of_life("t")
    now[0] = 5.05
    book.answered.record("t", ago_s=0.1)
    assert book.answered.at("t")[0] == pytest.approx(4.95) and book.last_sign("t") == 5.0


def test_grants_no_request_ever_finishes_are_forgotten_when_their_transfer_ends():
    """Cancelled before its request was scheduled, failed by its producer, or never claimed until its lease
    expired: nothing will `finish` such a transfer, so its end forgets it."""
    now = [0.0]
    pool = SlotPool(4, 100, 0.0, clock=lambda: now[0], on_expire=lambda key: book.expired(key))
    book = ReceiveBook(pool, 30.0, clock=lambda: now[0])
    for i in range(1000):
        book.granted(f"T{i}/h", 1, 10, "h")
        book.discard(f"T{i}")
    book.granted("F/h", 1, 10, "h")
    book.fail("F/h", "producer gave up")
    lease = pool.grant("E/h", [100], 5.0, "p")
    book.granted("E/h", lease.epoch, 10, "h")
    now[0] = 6.0
    assert pool.live("E/h") is None and book.status("E/h")[0].value == "ENDED"
    assert book._granted == {}


def test_a_prompts_discarded_key_forgets_its_grant_and_leaves_the_requests_other_prompts():
    """The scheduler discards one engine request's transfer by its key (transfer id/prompt hash), the router a
    whole request by its transfer id: either forgets the grants nothing will read."""
    book = ReceiveBook(SlotPool(4, 100, 0.0), 30.0)
    book.granted("T/a", 1, 10, "a")
    book.granted("T/b", 2, 10, "b")
    book.discard("T/a")
    assert "T/a" not in book._granted and "T/b" in book._granted
    book.discard("T")
    assert book._granted == {}


def test_claims_that_never_come_are_forgotten_when_the_lease_ends_but_a_waiting_request_keeps_its_own():
    book = ReceiveBook(SlotPool(4, 100, 0.0), 30.0)
    book.expect("n2/h", 10, "h", claims=2)  # parallel sampling: the second child never comes
    book.granted("n2/h", 1, 10, "h")
    book.finish("n2/h", None, {"state": "ABORTED", "reason": "", "ms": {}})
    book.expect("w/h", 10, "h")  # still waiting for its transfer when the router cancels it
    book.granted("w/h", 2, 10, "h")
    book.fail("n2/h", "lease expired")
    book.discard("w")
    assert "n2/h" not in book._expected and "n2/h" not in book._granted
    assert book.held_chunks("w/h") == 0 and "w/h" in book._granted  # its finish forgets it
    book.finish("w/h", None, {"state": "ABORTED", "reason": "cancelled", "ms": {}})
    assert book._expected == {} and book._granted == {}


def test_the_same_prompt_twice_in_one_request_is_read_by_both_engine_requests():
    """Both wait for the one transfer their shared key names (claims=1 each: the router counts `n`, not repeats);
    the first one done must not free the slots the second is about to read."""
    pool = SlotPool(4, 100, 0.0)
    book = ReceiveBook(pool, 30.0)
    book.expect("t/h", 10, "h")
    book.expect("t/h", 10, "h")
    lease = pool.grant("t/h", [100], 5.0, "p")
    book.granted("t/h", lease.epoch, 10, "h")
    assert pool.accept(ChunkNotice(transfer_id="t/h", chunk=0, epoch=lease.epoch, incarnation="p", nbytes=100)) == ""
    for _ in range(2):
        got, why = book.claim("t/h")
        assert got is lease, why
        book.finish("t/h", got, {"state": "SCATTERED", "reason": "", "ms": {}})
    assert pool.live("t/h") is None and pool.stats().free == 4 and book._expected == {}
    # its prefill node pushes the prompt once per repeat: the late second push is ended, not leased for nobody
    assert book.check_alloc("t/h", 10, "h") == DELIVERED
    book.expect("t/h", 10, "h")  # a repeat scheduled after the others read it: ended at once, it recomputes
    assert book.status("t/h") == (Arrival.ENDED, DELIVERED)
    book.expect("v/h", 10, "h")  # a request that ended otherwise (preempted): a new attempt's push is let in
    book.finish("v/h", None, {"state": "ABORTED", "reason": "preempted", "ms": {}})
    assert book.check_alloc("v/h", 10, "h") == ""


def test_remembered_transfers_are_forgotten_from_the_front_when_expired_or_at_the_bound():
    """Every delivered transfer is remembered (a late push of it is refused), so an insert must not scan the whole
    memory: keys expire in the order they came, and the oldest go first at the bound."""
    now = [0.0]
    ended = EndedKeys(remember_s=10, max_ended=1000, clock=lambda: now[0])
    for i in range(1000):
        now[0] = i * 0.001
        ended.remember(f"k{i}", "done")
    now[0] = 5.0
    ended.remember("fresh", "done")  # at the bound: k0 goes, the rest stay
    assert len(ended) == 1000 and ended.reason("k0") == "" and ended.reason("k1") == "done"
    now[0] = 10.0025  # k1 and k2 expired by now: dropped as the next key comes, below the bound
    ended.remember("fresh-2", "done")
    assert len(ended) == 999 and ended.reason("k2") == "" and ended.reason("k3") == "done"
    assert ended.reason("fresh") == "done"

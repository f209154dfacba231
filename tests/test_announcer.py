"""The announcer's promises: a consumer that does not answer delays only its own signs of life, a full
backlog drops (and counts) instead of growing, and closing does not wait for the unsent ones."""
from __future__ import annotations

import threading
import time

from transfer.announcer import Announcer


class FakeLink:
    """A consumer link whose PENDING calls are recorded; a `stuck` one blocks until released."""

    def __init__(self, address: str, stuck: threading.Event | None = None) -> None:
        self.address, self.stuck, self.sent = address, stuck, []
        self.arrived, self.calling = threading.Event(), threading.Event()

    def pending(self, key: str) -> bool:
        self.calling.set()
        if self.stuck is not None:
            self.stuck.wait(10)
        self.sent.append(key)
        self.arrived.set()
        return True

    def close(self) -> None:
        pass


def make(links: dict[str, FakeLink], stuck: threading.Event):
    def make_link(address: str) -> FakeLink:
        links[address] = FakeLink(address, stuck if address == "silent" else None)
        return links[address]
    return make_link


def test_a_silent_consumer_does_not_hold_up_another_consumers_signs():
    links, stuck = {}, threading.Event()
    a = Announcer(make(links, stuck))
    try:
        for i in range(50):
            a.announce(f"t{i}", "silent")
        a.announce("mine", "live")
        assert links["live"].arrived.wait(5), "the live consumer's PENDING waited behind the silent one's"
        assert links["live"].sent == ["mine"] and links["silent"].sent == []
    finally:
        stuck.set()
        a.close()


def test_a_full_backlog_drops_and_counts_then_accepts_again():
    links, stuck = {}, threading.Event()
    a = Announcer(make(links, stuck), max_backlog=3)
    try:
        for i in range(5):
            a.announce(f"t{i}", "silent")
        assert a.dropped == 2
        stuck.set()
        deadline = time.monotonic() + 5
        while len(links["silent"].sent) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert links["silent"].sent == ["t0", "t1", "t2"]
        a.announce("again", "live")
        assert links["live"].arrived.wait(5) and a.dropped == 2
    finally:
        stuck.set()
        a.close()


def test_close_drops_what_is_not_sent_yet():
    links, stuck = {}, threading.Event()
    a = Announcer(make(links, stuck))
    for i in range(20):
        a.announce(f"t{i}", "silent")
    assert links["silent"].calling.wait(5)  # t0's call is under way (the link's thread may start late)
    threading.Timer(0.2, stuck.set).start()  # the call under way ends; the 19 queued behind it are dropped
    a.close()
    assert links["silent"].sent == ["t0"]

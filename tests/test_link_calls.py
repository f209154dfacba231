"""Per-consumer call threads: calls to one consumer run in order, and nothing is sent once closing began."""
from __future__ import annotations

import threading

import pytest

from transfer.link_calls import LinkCalls, LinksClosed


class Recorder:
    def __init__(self, address: str) -> None:
        self.address, self.calls, self.closed = address, [], False

    def close(self) -> None:
        self.closed = True


def test_calls_to_one_consumer_run_in_order_and_close_finishes_them():
    links: dict[str, Recorder] = {}
    answered = threading.Semaphore(0)
    calls = LinkCalls(lambda a: links.setdefault(a, Recorder(a)), answered.release)
    futures = [calls.submit("c0", lambda link, i=i: link.calls.append(i)) for i in range(20)]
    calls.close()
    assert links["c0"].calls == list(range(20)) and all(f.done() for f in futures) and links["c0"].closed


def test_a_call_submitted_after_close_is_refused_not_sent():
    links: dict[str, Recorder] = {}
    calls = LinkCalls(lambda a: links.setdefault(a, Recorder(a)), lambda: None)
    calls.submit("c0", lambda link: link.calls.append("before")).result(5)
    calls.close()
    late = calls.submit("c0", lambda link: link.calls.append("after"))
    with pytest.raises(LinksClosed, match="closing"):
        late.result(5)
    assert links["c0"].calls == ["before"]

"""storage/deadline.py: a remote tier's call waited for only up to a budget, and its failures told once."""
from __future__ import annotations

import logging
import time

from storage.deadline import Deadline


def test_a_remote_call_that_raises_leaves_later_calls_answered():
    """A Redis client error that is not a RedisError ended the thread, and every later lookup answered
    "not held" without asking Redis."""
    deadline = Deadline("raising", budget_s=5.0)
    try:
        t0 = time.monotonic()
        assert deadline.call(lambda: 1 // 0) is None
        assert time.monotonic() - t0 < 2.5, "a call that raised is answered at once, not after the budget"
        assert deadline.call(lambda: 7) == 7
    finally:
        deadline.close()


def test_an_error_that_recurs_on_every_call_is_logged_once_a_minute_with_its_count(caplog):
    """A tier failing the same way on every lookup (wrong password, a renamed command) wrote a stack trace
    per scheduler step."""
    now = [0.0]
    deadline = Deadline("failing", budget_s=5.0, clock=lambda: now[0])
    try:
        with caplog.at_level(logging.ERROR, logger="kvbridge.store"):
            for _ in range(3):
                assert deadline.call(lambda: 1 // 0) is None
            assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None
            assert deadline.call(lambda: [][1]) is None  # another error is told at once
            assert len(caplog.records) == 2
            now[0] = 61.0
            assert deadline.call(lambda: 1 // 0) is None
        assert len(caplog.records) == 3
        assert "2 more times" in caplog.records[2].getMessage()
    finally:
        deadline.close()

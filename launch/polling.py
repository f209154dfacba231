"""Waiting on another process's state by polling, the one way kvbridge's launcher, tests and benches wait.

A server starting up, a pool draining, a metric reaching a value: none of these offer a callback
across a process boundary, so callers ask again until the answer is yes or the time is up.
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition") -> T:
    """Call `predicate` until it returns something truthy and return that value; TimeoutError naming
    `what` after `timeout` seconds. The predicate may raise to end the wait early (a server that
    exited while starting should not be waited on for minutes)."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)

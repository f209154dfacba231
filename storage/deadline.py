"""Calls to a remote tier that the caller waits for only up to a budget.

A lookup runs on vLLM's scheduler path: it must answer in milliseconds even while Redis is stopped
(SIGSTOP), slow, or behind a dead link, where a socket timeout alone would hold it for the whole
timeout on every retry. So the call runs on its own thread and the caller waits at most `budget_s`;
a call still running when the next one comes means the tier is stuck, and the next one answers
"no answer" at once instead of queueing behind it.

A call that raises is logged with its stack the first time its error is seen and then at most once a
`REPEAT_LOG_S`, with how many times it recurred since: a tier that fails the same way on every lookup
(a wrong password, a renamed command) would otherwise write a stack per scheduler step.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Generic, TypeVar

from prometheus_client import Counter

from transfer.threads import start_io_thread

log = logging.getLogger("kvbridge.store")
T = TypeVar("T")
LATE = Counter("kvbridge_store_late_answers_total", "Remote tier calls not answered within the lookup budget",
               ["tier"])
FAILED = Counter("kvbridge_store_failed_calls_total", "Remote tier calls that raised (their chunks count as not held)",
                 ["tier"])
REPEAT_LOG_S = 60.0


class Deadline(Generic[T]):
    """One background thread; `call` returns fn's result, or None when it took longer than the budget or
    raised (logged: the thread lives on, so later calls are still answered)."""

    def __init__(self, name: str, budget_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.budget_s = budget_s
        self._clock = clock
        self._logged: dict[str, tuple[float, int]] = {}  # error -> (when its stack was last logged, repeats since)
        self._cv = threading.Condition()
        self._job: Callable[[], object] | None = None
        self._busy = False
        self._stop = False
        self._thread = start_io_thread(self._run, f"kvbridge-store-{name}")

    def call(self, fn: Callable[[], T]) -> T | None:
        box: list = []  # filled with the result by the thread; a caller that gave up never reads it
        done = threading.Event()

        def job() -> None:
            try:
                box.append(fn())
            except Exception as e:  # a tier bug: this call's chunks count as missing, the next call is still made
                self._log_failure(e)
            finally:
                done.set()
        with self._cv:
            if self._busy:
                LATE.labels(self.name).inc()
                return None
            self._busy = True
            self._job = job
            self._cv.notify()
        if done.wait(self.budget_s):
            return box[0] if box else None
        LATE.labels(self.name).inc()
        return None

    def _log_failure(self, e: Exception) -> None:
        FAILED.labels(self.name).inc()
        error, now = f"{type(e).__name__}: {e}", self._clock()
        last, repeats = self._logged.get(error, (None, 0))
        if last is not None and now - last < REPEAT_LOG_S:
            self._logged[error] = (last, repeats + 1)
            return
        if len(self._logged) >= 64:  # bounded: errors that carry ever-changing text are not kept for good
            self._logged.clear()
        self._logged[error] = (now, 0)
        since = f" (it failed so {repeats} more times since it was last logged)" if repeats else ""
        log.error("store: a %s call failed; its chunks count as not held%s", self.name, since, exc_info=e)

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._job is None and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                job, self._job = self._job, None
            try:
                job()
            finally:
                with self._cv:
                    self._busy = False

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()

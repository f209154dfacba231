"""Admission: caps on requests in flight, in total and per instance, so overload is a fast 429 with
`Retry-After` instead of an unbounded queue that makes every request slow."""
from __future__ import annotations

from router.metrics import REJECTED
from router.openai_errors import APIError


class AtCapacity(APIError):
    """Every live instance of `kind` (or the router as a whole) holds its cap of requests in flight."""

    def __init__(self, what: str, cap: int, retry_after_s: int) -> None:
        super().__init__(429, f"{what} is at its cap of {cap} requests in flight; retry after {retry_after_s} s",
                         "rate_limit_exceeded", code="at_capacity")
        self.retry_after_s = retry_after_s
        REJECTED.labels(what.split(" ")[0]).inc()

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Admission:
    """The router-wide in-flight count. `enter` raises AtCapacity past the cap; `leave` undoes `enter`."""

    def __init__(self, cap: int | None, retry_after_s: int) -> None:
        self.cap, self.retry_after_s, self.inflight = cap, retry_after_s, 0

    def enter(self) -> None:
        if self.cap is not None and self.inflight >= self.cap:
            raise AtCapacity("router", self.cap, self.retry_after_s)
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1

"""A wait on a backend, bounded twice: by its own timeout and by the node's abandonment.

The registry abandons a node that stayed down by its health checks for `abandon_after_s` (router/registry.py):
whatever still waits on it is ended, so no request hangs on a node that vanished without closing its connections.
One timer and one watcher per wait: asyncio.timeout beside a separate watch cost each of a request's four waits
(both legs' headers and bodies) a second context, about a tenth of the router's own work per request.
"""
from __future__ import annotations

import asyncio

from router.failures import UpstreamFailure
from router.registry import Backend

ABANDONED = "down (health checks) while this request waited on it"


class BackendWait:
    """While inside, the current task is cancelled when `timeout_s` passes or `backend` is abandoned, whichever
    comes first; that cancel leaves the block as an UpstreamFailure naming the node and saying which ("timed out",
    or down). A cancel of anyone else's (the client leaving) stays a cancel."""
    __slots__ = ("backend", "timeout_s", "why", "task", "timer", "cancelling")

    def __init__(self, backend: Backend, timeout_s: float) -> None:
        self.backend, self.timeout_s = backend, timeout_s
        self.why: str | None = None

    def __enter__(self) -> BackendWait:
        self.task = asyncio.current_task()
        self.cancelling = self.task.cancelling()
        self.timer = asyncio.get_running_loop().call_later(self.timeout_s, self._fire, "timed out")
        self.backend.watchers.add(self._abandoned)
        return self

    def _abandoned(self) -> None:
        self._fire(ABANDONED)

    def _fire(self, why: str) -> None:
        if self.why is None:  # one cancel, so that any second one is known to be someone else's
            self.why = why
            self.task.cancel()

    def __exit__(self, et: type | None, e: BaseException | None, tb: object) -> None:
        self.timer.cancel()
        self.backend.watchers.discard(self._abandoned)
        if self.why is not None and isinstance(e, asyncio.CancelledError) and self.task.uncancel() <= self.cancelling:
            raise UpstreamFailure(self.backend.name, self.why) from None

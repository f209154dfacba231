"""Whose fault: the two kinds of failure a proxied request can meet, kept apart by type.

A write to a client that went away raises a connection error too (aiohttp's
`ClientConnectionResetError` is a `ClientConnectionError`), so catching connection errors
around the whole relay would blame the backend for its client's impatience. Every client write
goes through `ClientGone`, every backend call through `UpstreamFailure`, and only the latter is
reported to the registry.
"""
from __future__ import annotations


class ClientGone(Exception):
    """The client closed its connection (reset, closed transport, or its handler was cancelled).
    Ends the request and cancels its legs; never counts against a backend."""


class UpstreamFailure(Exception):
    """Talking to backend `backend` failed: connection refused or reset, a timeout, a 5xx, or the
    registry marked it down while the request waited on it. Counts against that backend."""

    def __init__(self, backend: str, why: str) -> None:
        super().__init__(f"{backend}: {why}")
        self.backend, self.why = backend, why

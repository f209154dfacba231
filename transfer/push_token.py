"""Signed push targets: only the router decides where a prefill node's KV goes.

A prefill node's HTTP port takes `kv_transfer_params` from anyone who reaches it. Without this
check a client could name its own host as `push_to` and receive the producer's NIXL metadata, and
with it a path into staging memory that holds other requests' KV. So the router signs each prefill
leg's target: a token binding `transfer_id`, `push_to` and an expiry with a key derived from the
deployment secret (`push-token`), and the producer pushes only when the token checks out. For
deployments without a router, `push_allow` lists consumer addresses a producer may push to unsigned.
Without any secret (loopback development) only loopback targets are pushed to, unless `insecure`.
"""
from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

from transfer.credentials import derive, is_loopback
from transfer.rank_address import host_port_error


def _mac(key: bytes, transfer_id: str, push_to: str, expires_ms: int) -> str:
    msg = f"{len(transfer_id)}:{transfer_id}|{len(push_to)}:{push_to}|{expires_ms}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def push_key(secret: bytes) -> bytes:
    return derive(secret, "push-token")


def sign(key: bytes, transfer_id: str, push_to: str, ttl_s: float, now: float | None = None) -> str:
    """The token for one prefill leg: '<expiry ms>.<hex mac>'."""
    expires_ms = int(((time.time() if now is None else now) + ttl_s) * 1000)
    return f"{expires_ms}.{_mac(key, transfer_id, push_to, expires_ms)}"


@dataclass(frozen=True)
class PushPolicy:
    """What a producer checks before it contacts a push target."""
    key: bytes | None = None              # push_key(secret); None: no deployment secret
    allow: frozenset[str] = frozenset()   # host:port targets pushed to without a token
    insecure: bool = False                # no secret and any target (development on several hosts)

    def refusal(self, transfer_id: str, push_to: str, token: str | None, now: float | None = None) -> str:
        """'' when the producer may push this transfer to `push_to`; else why not (for the log and the
        request's answer: it names no secret). Never raises: it runs in vLLM's scheduler."""
        malformed = host_port_error(push_to)
        if malformed:
            return malformed
        if push_to in self.allow:
            return ""
        if self.key is None:
            host = push_to.rsplit(":", 1)[0].strip("[]")
            if self.insecure or is_loopback(host, resolve=False):  # no DNS lookup in vLLM's scheduler
                return ""
            return f"push target {push_to} is not loopback nor in push_allow, and no secret is set to sign it"
        if not token:
            return "push target carries no push token (only the router may name one)"
        exp, _, mac = token.partition(".")
        want = _mac(self.key, transfer_id, push_to, int(exp)) if exp.isascii() and exp.isdigit() else ""
        if not want or not hmac.compare_digest(mac.encode(), want.encode()):
            return "push token does not match this transfer and target"
        if int(exp) < ((time.time() if now is None else now) * 1000):
            return "push token expired"
        return ""

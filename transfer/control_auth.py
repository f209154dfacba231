"""Authenticated control frames: an HMAC over each message, a nonce and a timestamp window.

Why HMAC and not ZMQ CURVE: CURVE encrypts and authenticates a *connection* with key pairs, which
means a keypair per node, a ZAP handler to map public keys to producer ids and a key distribution
story, and it still authenticates no single message. kvbridge already has one deployment secret
(the router signs push targets and the store MACs chunks with keys derived from it); an HMAC per
frame with the standard library reuses it, binds each message to the key of the sender it names
(`producer/<id>` or `router`, see credentials.derive), and costs ~2 µs per message. Control
messages carry no confidential data (layouts, slot offsets, transfer ids), so integrity and
authenticity are what matter; the NIXL data path is out of its reach either way (SECURITY.md).

Frame (msgpack map): v, from, ts (ms), nonce (16 bytes), body (a wire message), mac.
A request's MAC is keyed by its sender's key; a reply's by the same key and bound to the
request's nonce, so neither can be replayed, redirected or forged without that key. Without a
secret (loopback development) the same frames travel with an empty MAC that nobody checks.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import msgpack

from transfer import wire
from transfer.credentials import derive

FRAME_VERSION = wire.PROTOCOL_VERSION
MAX_SENDER = 300
UNSIGNED_NONCE = b"\0" * 16  # replies to frames that could not be opened carry no request's nonce


class AuthError(ValueError):
    """A frame that is not an authentic, fresh control message; `code` names the class of fault
    (shown to the peer only when no secret is configured: an authenticating endpoint says 'refused')."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def sender_key(secret: bytes, sender: str) -> bytes:
    return derive(secret, f"control/{sender}")


def _mac(key: bytes, kind: bytes, sender: str, ts: int, nonce: bytes, body: bytes) -> bytes:
    return hmac.digest(key, msgpack.packb([FRAME_VERSION, kind, sender, ts, nonce, body], use_bin_type=True),
                       hashlib.sha256)


def _frame(sender: str, ts: int, nonce: bytes, body: bytes, mac: bytes) -> bytes:
    return msgpack.packb({"v": FRAME_VERSION, "from": sender, "ts": ts, "nonce": nonce, "body": body, "mac": mac},
                         use_bin_type=True)


@dataclass(frozen=True)
class Opened:
    sender: str
    nonce: bytes
    body: bytes


def parse(raw: bytes) -> tuple[str, int, bytes, bytes, bytes]:
    """(sender, ts, nonce, body, mac) of a well-formed frame, or AuthError."""
    if len(raw) > wire.MAX_MESSAGE_BYTES:
        raise AuthError("too_large", f"frame of {len(raw)} bytes exceeds {wire.MAX_MESSAGE_BYTES}")
    try:
        obj = msgpack.unpackb(raw, raw=False)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise AuthError("malformed", f"not a msgpack frame: {type(e).__name__}") from e
    if not isinstance(obj, dict):
        raise AuthError("malformed", f"expected a map, got {type(obj).__name__}")
    if obj.get("v") != FRAME_VERSION:
        raise AuthError("version", f"protocol version {obj.get('v')!r}, this peer speaks {FRAME_VERSION}")
    sender, ts, nonce, body, mac = (obj.get(k) for k in ("from", "ts", "nonce", "body", "mac"))
    if not (isinstance(sender, str) and 0 < len(sender) <= MAX_SENDER and isinstance(ts, int)
            and not isinstance(ts, bool) and isinstance(nonce, bytes) and len(nonce) == 16
            and isinstance(body, bytes) and isinstance(mac, bytes)):
        raise AuthError("malformed", "frame lacks a valid from/ts/nonce/body/mac")
    return sender, ts, nonce, body, mac


class Credential:
    """The calling side: seals each request under its sender name and checks the reply to it."""

    def __init__(self, sender: str, secret: bytes | None) -> None:
        self.sender = sender
        self._key = sender_key(secret, sender) if secret is not None else None

    def seal(self, body: bytes) -> tuple[bytes, bytes]:
        """(frame, nonce) for one request; keep the nonce to open its reply."""
        ts, nonce = time.time_ns() // 1_000_000, os.urandom(16)
        mac = _mac(self._key, b"req", self.sender, ts, nonce, body) if self._key is not None else b""
        return _frame(self.sender, ts, nonce, body, mac), nonce

    def open_reply(self, raw: bytes, nonce: bytes) -> bytes:
        """The body of the reply to the request sent with `nonce`, or AuthError (forged, stale,
        answering another request, or the endpoint's generic refusal)."""
        sender, ts, got_nonce, body, mac = parse(raw)
        if got_nonce == UNSIGNED_NONCE and self._key is not None:
            raise AuthError("unauthenticated", "the endpoint refused the request: our credential is missing or "
                            "wrong, our clock is off by more than its window, or the frame was damaged")
        if got_nonce == UNSIGNED_NONCE:
            return body  # no secret: an endpoint's answer to a frame it could not open
        if got_nonce != nonce:
            raise AuthError("stale", "reply to another request")
        if self._key is not None and not hmac.compare_digest(
                mac, _mac(self._key, b"rep", sender, ts, nonce, body)):
            raise AuthError("unauthenticated", "the endpoint refused our credential, or its reply is not authentic")
        return body


class Authenticator:
    """The serving side: opens requests (MAC, timestamp window, nonce never seen before) and seals
    replies. The table of seen nonces is bounded: past `max_nonces` the oldest is dropped and
    nothing at or before its timestamp is accepted any more, so a replay stays impossible."""

    def __init__(self, secret: bytes | None, window_s: float = 30.0, max_nonces: int = 1 << 17) -> None:
        self.secret = secret
        self.window_ms = int(window_s * 1000)
        self.max_nonces = max_nonces
        self._keys: OrderedDict[str, bytes] = OrderedDict()
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # sender|nonce -> ts, oldest first
        self._floor_ts = -1

    @property
    def required(self) -> bool:
        return self.secret is not None

    def _key(self, sender: str) -> bytes:
        key = self._keys.get(sender)
        if key is None:
            key = self._keys[sender] = sender_key(self.secret, sender)
            if len(self._keys) > 4096:
                self._keys.popitem(last=False)
        return key

    def open(self, raw: bytes, now_ms: int | None = None) -> Opened:
        sender, ts, nonce, body, mac = parse(raw)
        if self.secret is None:
            return Opened(sender, nonce, body)
        if not hmac.compare_digest(mac, _mac(self._key(sender), b"req", sender, ts, nonce, body)):
            raise AuthError("unauthenticated", f"bad MAC from {sender[:64]!r}")
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        if abs(now - ts) > self.window_ms or ts <= self._floor_ts:
            raise AuthError("stale", f"timestamp {ts - now:+d} ms from now, outside the window")
        while self._seen and next(iter(self._seen.values())) < now - self.window_ms:
            self._seen.popitem(last=False)
        tag = sender.encode() + b"|" + nonce
        if tag in self._seen:
            raise AuthError("replayed", f"nonce from {sender[:64]!r} seen before")
        self._seen[tag] = ts
        if len(self._seen) > self.max_nonces:
            _, dropped_ts = self._seen.popitem(last=False)
            self._floor_ts = max(self._floor_ts, dropped_ts)
        return Opened(sender, nonce, body)

    def seal_reply(self, opened: Opened | None, body: bytes) -> bytes:
        """A reply to `opened` (None: to a frame that could not be opened, sent unsigned)."""
        ts = time.time_ns() // 1_000_000
        if opened is None:
            return _frame("consumer", ts, UNSIGNED_NONCE, body, b"")
        mac = _mac(self._key(opened.sender), b"rep", "consumer", ts, opened.nonce, body) if self.required else b""
        return _frame("consumer", ts, opened.nonce, body, mac)

"""Where the deployment secret comes from, and the keys derived from it.

One secret per deployment (one trust domain). It is read from an environment variable or a file
at run time, never from a config value, so it cannot reach vLLM's command line (`ps`), a log or
`kvbridge config check`. Nothing uses the secret itself: each purpose gets its own key,
HMAC-SHA256(secret, purpose), so a key that leaks from one place (a store MAC, a push token)
says nothing about the others, and each producer signs with a key bound to its own id.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
from pathlib import Path

DEFAULT_SECRET_ENV = "KVBRIDGE_SECRET"


class CredentialError(ValueError):
    """The secret is configured but cannot be read, or a listener may not start without one."""


def load_secret(env: str | None = DEFAULT_SECRET_ENV, file: str | Path | None = None) -> bytes | None:
    """The deployment secret from `file` (when given) or the environment variable `env`; None when
    neither holds one. A file that is named but unreadable or empty is an error, never 'no secret'."""
    if file:
        try:
            value = Path(file).read_text().strip()
        except OSError as e:
            raise CredentialError(f"secret file {file}: cannot read it: {e.strerror}") from None
        if not value:
            raise CredentialError(f"secret file {file} is empty")
        return value.encode()
    value = os.environ.get(env) if env else None
    return value.encode() if value else None


def derive(secret: bytes, purpose: str) -> bytes:
    """The key for one purpose (`control/router`, `control/producer/<id>`, `push-token`, `store`)."""
    return hmac.digest(secret, b"kvbridge/" + purpose.encode(), hashlib.sha256)


def is_loopback(host: str, resolve: bool = True) -> bool:
    """True for 127.0.0.0/8, ::1, `localhost`, and (with `resolve`) names that resolve only to loopback."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host == "localhost" or not resolve:
        return host == "localhost"
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


LEASE_RISK = "lease slots, write KV and read its layout"
ADMIN_RISK = "read the store's statistics and clear it"


def require_secret(host: str, secret: bytes | None, insecure: bool, what: str, risk: str = LEASE_RISK) -> str:
    """Refuse a listener on a routable address without a secret; returns a warning to log when the
    config accepts that (`insecure: true`), '' when there is nothing to say."""
    if secret is not None or is_loopback(host):
        return ""
    if not insecure:
        raise CredentialError(
            f"{what} would listen on {host} without a secret: anyone who reaches it could {risk}. "
            f"Set {DEFAULT_SECRET_ENV} (or connector secret_file) to the same value on every node and the router, "
            "listen on 127.0.0.1, or set connector insecure: true to accept this")
    return f"INSECURE: {what} listens on {host} without a secret (insecure: true); any peer that reaches it can {risk}"

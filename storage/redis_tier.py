"""Redis tier: chunks shared across nodes through a real Redis server (the `redis` client).

Redis owns capacity and eviction (`maxmemory` + an LRU policy on the server); keys may also get
a TTL. A Redis that is down or slow degrades the store, never a request: every call has a short
socket timeout, and after a failure the tier answers "not here" at once for `retry_s` before it
tries the server again. Batches (lookups, background writes) go in one pipelined round trip.
Whoever can write to Redis can write any value: each carries a MAC over its key and bytes
(framing.py), and one that fails it is a counted miss, never KV, and is deleted: left in place it would
still answer EXISTS, so every lookup would report the chunk held and every load would recompute it.
Keys are prefixed with a tag of the store key, so deployments sharing one Redis (or one deployment
after a secret rotation) never see, nor delete, each other's values.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time

import redis
import torch

from storage.framing import HEADER, UNKEYED, BadChunk, check, header, parse_header
from storage.tier import BYTES_WRITTEN, ERRORS, REJECTED, count_read, timed

log = logging.getLogger("kvbridge.store")

# Deletes a value only while it still starts with the header that failed: an honest value written since stays.
_DELETE_IF_UNCHANGED = """
if redis.call('GETRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def deployment_prefix(mac_key: bytes | None) -> str:
    """`kvbridge:chunk:<tag>:`, the tag a keyed hash of the store key (it tells nothing of the key): values
    another deployment wrote, which fail our MAC, are not even looked at."""
    tag = hmac.new(mac_key or UNKEYED, b"kvbridge redis key prefix", hashlib.sha256).hexdigest()[:16]
    return f"kvbridge:chunk:{tag}:"


class RedisTier:
    remote = True  # the store waits for its lookups only up to a budget (storage/deadline.py)

    def __init__(self, url: str, ttl_s: float | None = None, timeout_s: float = 0.5, retry_s: float = 2.0,
                 prefix: str | None = None, name: str = "redis", mac_key: bytes | None = None) -> None:
        self.name = name
        self._mac_key = mac_key
        self.url = url
        self.ttl_ms = int(ttl_s * 1000) if ttl_s else None
        self.retry_s = retry_s
        self.prefix = deployment_prefix(mac_key) if prefix is None else prefix
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._delete_if_unchanged = self._client.register_script(_DELETE_IF_UNCHANGED)
        self._down_until = 0.0
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, op: str, e: Exception) -> None:
        ERRORS.labels(self.name, op).inc()
        with self._lock:
            if self.available:
                log.warning("redis tier %s: %s failed (%s); treating it as empty for %.1fs", self.url, op, e,
                            self.retry_s)
            self._down_until = time.monotonic() + self.retry_s

    def put(self, key: str, data: torch.Tensor) -> bool:
        return self.put_many([(key, data)]) == 1

    def put_many(self, items: list[tuple[str, torch.Tensor]]) -> int:
        """Write a batch in one pipelined round trip; returns how many were written."""
        if not items or not self.available:
            return 0
        try:
            with timed(self.name, "put"):
                pipe = self._client.pipeline(transaction=False)
                total = 0
                for key, data in items:
                    payload = data.reshape(-1).view(torch.uint8).contiguous().numpy()
                    pipe.set(self.prefix + key, header(self._mac_key, key, payload) + payload.tobytes(), px=self.ttl_ms)
                    total += payload.nbytes
                pipe.execute()
        except redis.RedisError as e:
            self._failed("put", e)
            return 0
        BYTES_WRITTEN.labels(self.name).inc(total)
        return len(items)

    def get(self, key: str) -> torch.Tensor | None:
        if not self.available:
            return count_read(self.name, None)
        try:
            with timed(self.name, "get"):
                raw = self._client.get(self.prefix + key)
        except redis.RedisError as e:
            self._failed("get", e)
            return count_read(self.name, None)
        if raw is None:
            return count_read(self.name, None)
        try:
            _, tag = parse_header(raw, len(raw))
            out = torch.frombuffer(bytearray(memoryview(raw)[HEADER.size:]), dtype=torch.uint8)
            check(self._mac_key, key, out.numpy(), tag)
        except BadChunk as e:
            REJECTED.labels(self.name).inc()
            log.warning("redis tier %s: deleting bad value for chunk %s: %s", self.url, key[:12], e)
            self._delete_bad(key, raw)
            return count_read(self.name, None)
        return count_read(self.name, out)

    def _delete_bad(self, key: str, raw: bytes) -> None:
        """Delete a value that failed its check, unless it was replaced since the read."""
        try:
            self._delete_if_unchanged(keys=[self.prefix + key], args=[raw[:HEADER.size], HEADER.size])
        except redis.RedisError as e:  # not marked down: reads work, only this delete did not (an ACL, say)
            ERRORS.labels(self.name, "delete").inc()
            log.warning("redis tier %s: could not delete bad value for chunk %s: %s", self.url, key[:12], e)

    def contains(self, keys: list[str]) -> list[bool]:
        if not keys or not self.available:
            return [False] * len(keys)
        try:
            with timed(self.name, "contains"):
                pipe = self._client.pipeline(transaction=False)
                for k in keys:
                    pipe.exists(self.prefix + k)
                return [bool(x) for x in pipe.execute()]
        except redis.RedisError as e:
            self._failed("contains", e)
            return [False] * len(keys)

    def _scan(self, remove: bool) -> int:
        """Count (and with `remove`, unlink) every key under this store's prefix, in batches."""
        n = 0
        try:
            batch: list[bytes] = []
            for key in self._client.scan_iter(match=self.prefix + "*", count=1000):
                batch.append(key)
                if len(batch) == 1000:
                    n += self._client.unlink(*batch) if remove else len(batch)
                    batch = []
            if batch:
                n += self._client.unlink(*batch) if remove else len(batch)
        except redis.RedisError as e:
            self._failed("clear" if remove else "count", e)
        return n

    def count(self) -> int:
        return self._scan(remove=False)

    def clear(self) -> int:
        """Unlink every chunk under the prefix: shared by every node of this deployment, so cleared for all."""
        return self._scan(remove=True)

    def close(self) -> None:
        self._client.close()

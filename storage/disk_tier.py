"""Local-disk tier: one file per chunk under a directory, LRU within a byte budget, kept across restarts.

Crash safety: a chunk is written to a `.part` file, fsynced, then renamed over its final name,
so a reader sees a whole file or none (a batch is written whole, then fsynced, then renamed, so the
device sees one stream of writes rather than a flush per chunk); leftover `.part` files from a killed
writer are removed at start. Each file carries a header (magic, version, length, MAC over key and bytes,
see framing.py) that a read checks, so a file damaged or written by anyone without the store key is
deleted and read as a miss, never returned as KV. The LRU order is the
files' mtimes (a read touches its file), so it survives a restart too.
"""
from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from storage.framing import HEADER, BadChunk, check, header, parse_header
from storage.tier import BYTES_WRITTEN, ERRORS, EVICTIONS, REJECTED, USED_BYTES, count_read, timed

log = logging.getLogger("kvbridge.store")


class DiskTier:
    def __init__(self, path: str | Path, capacity_bytes: int, name: str = "disk", mac_key: bytes | None = None) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"disk tier capacity must be positive, got {capacity_bytes}")
        self.name = name
        self._mac_key = mac_key
        self.root = Path(path)
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity_bytes
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> file bytes, least recently used first
        self.used = 0
        self._scan()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.kvc"

    def _scan(self) -> None:
        found = []
        for p in self.root.glob("*/*"):
            if p.suffix == ".part":
                p.unlink(missing_ok=True)
                log.warning("disk tier %s: removed %s left by a writer that did not finish", self.root, p.name)
            elif p.suffix == ".kvc":
                try:
                    st = p.stat()
                except FileNotFoundError:  # removed since the listing (a clear, another process): not held
                    continue
                found.append((st.st_mtime_ns, p.stem, st.st_size))
        for _, key, size in sorted(found):
            self._index[key] = size
            self.used += size
        self._evict(0)
        USED_BYTES.labels(self.name).set(self.used)
        if found:
            log.info("disk tier %s: %d chunks, %d bytes kept from before", self.root, len(self._index), self.used)

    def _evict(self, incoming: int) -> None:
        while self._index and self.used + incoming > self.capacity:
            key, size = self._index.popitem(last=False)
            self._path(key).unlink(missing_ok=True)
            self.used -= size
            EVICTIONS.labels(self.name).inc()

    def put(self, key: str, data: torch.Tensor) -> bool:
        return self.put_many([(key, data)]) == 1

    def put_many(self, items: list[tuple[str, torch.Tensor]]) -> int:
        """Write a batch with one flush to the device for all of it (each file is written whole, then all
        are fsynced, then all renamed): a chunk is under its final name only once its bytes are on disk.
        Returns how many chunks the tier holds afterwards."""
        staged: list[tuple[str, Path, Path, int, int]] = []  # key, part, final, file bytes, payload bytes
        kept = 0
        with timed(self.name, "put"):
            for key, data in items:
                payload = data.reshape(-1).view(torch.uint8).contiguous().numpy()
                size = HEADER.size + payload.nbytes
                with self._lock:
                    if key in self._index:
                        self._index.move_to_end(key)
                        kept += 1
                        continue
                if size > self.capacity:
                    continue
                final = self._path(key)
                part = final.parent / f"{key}.{uuid.uuid4().hex[:8]}.part"
                try:
                    final.parent.mkdir(exist_ok=True)
                    with open(part, "wb") as f:
                        f.write(header(self._mac_key, key, payload))
                        f.write(memoryview(payload))
                    staged.append((key, part, final, size, payload.nbytes))
                except OSError as e:
                    self._write_failed(part, key, e)
            for key, part, final, size, nbytes in staged:
                try:
                    fd = os.open(part, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    with self._lock:
                        self._evict(size)
                        os.replace(part, final)
                        self._index[key] = size
                        self.used += size
                        USED_BYTES.labels(self.name).set(self.used)
                except OSError as e:
                    self._write_failed(part, key, e)
                    continue
                BYTES_WRITTEN.labels(self.name).inc(nbytes)
                kept += 1
        return kept

    def _write_failed(self, part: Path, key: str, e: OSError) -> None:
        part.unlink(missing_ok=True)
        ERRORS.labels(self.name, "put").inc()
        log.warning("disk tier %s: could not write chunk %s: %s", self.root, key[:12], e)

    def get(self, key: str, into: Callable[[int], torch.Tensor | None] | None = None) -> torch.Tensor | None:
        """The chunk's bytes, read into `into(payload bytes)` when that gives a buffer (the memory tier's
        slot, touched already: no page faults, no second copy to promote it), else into a new tensor."""
        with self._lock:
            if key not in self._index:
                return count_read(self.name, None)
            self._index.move_to_end(key)
        path = self._path(key)
        with timed(self.name, "get"):
            data = self._read(path, key, into)
        if data is None:
            with self._lock:
                size = self._index.pop(key, 0)
                self.used -= size
        else:
            try:
                os.utime(path)  # the LRU order, kept across restarts
            except OSError:  # removed since the read (a clear, an eviction): the bytes read are whole and checked
                pass
        return count_read(self.name, data)

    def _read(self, path: Path, key: str, into: Callable[[int], torch.Tensor | None] | None) -> torch.Tensor | None:
        try:
            with open(path, "rb") as f:
                n, tag = parse_header(f.read(HEADER.size), os.fstat(f.fileno()).st_size)
                out = into(n) if into is not None else None
                if out is None:
                    out = torch.empty(n, dtype=torch.uint8)
                if f.readinto(memoryview(out.numpy())) != n:
                    raise BadChunk("file ended early")
                check(self._mac_key, key, out.numpy(), tag)
                return out
        except FileNotFoundError:  # cleared or evicted since the index said it was here: a plain miss
            return None
        except (OSError, BadChunk) as e:
            (REJECTED.labels(self.name) if isinstance(e, BadChunk) else ERRORS.labels(self.name, "get")).inc()
            log.warning("disk tier %s: dropping unreadable chunk %s: %s", self.root, key[:12], e)
            path.unlink(missing_ok=True)
            return None

    def contains(self, keys: list[str]) -> list[bool]:
        """Which keys are held; a held key counts as used, as in the memory tier (in this process's order;
        only a read touches the file's mtime, the order a restart rebuilds)."""
        with self._lock:
            held = [k in self._index for k in keys]
            for k, h in zip(keys, held):
                if h:
                    self._index.move_to_end(k)
            return held

    def keys(self) -> list[str]:
        """Least recently used first."""
        with self._lock:
            return list(self._index)

    def count(self) -> int:
        return len(self._index)

    def clear(self) -> int:
        """Delete every chunk file; a read that opened its file before keeps reading it, one that comes
        after finds no file and misses. Returns how many chunks were held."""
        with self._lock:
            keys, self._index = list(self._index), OrderedDict()
            self.used = 0
            USED_BYTES.labels(self.name).set(0)
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        return len(keys)

    def close(self) -> None:
        return None

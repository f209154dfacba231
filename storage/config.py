"""The store's settings (the `store:` section of a role's connector config), with sizes in bytes
or as "512MiB" / "10GB" strings."""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from storage.disk_tier import DiskTier
from storage.memory_tier import MemoryTier
from storage.redis_tier import RedisTier
from storage.tiered_store import TieredStore

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(v: int | str) -> int:
    if isinstance(v, int):
        return v
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(v))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{v!r} is not a size (write 512MiB, 2GiB or a number of bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    memory_bytes: int = Field(default=2 * 2**30, ge=0, description="CPU-memory tier budget; 0 turns it off")
    disk_path: str | None = Field(default=None, description="local-disk tier directory; unset turns it off")
    disk_bytes: int = Field(default=20 * 2**30, gt=0, description="local-disk tier budget")
    redis_url: str | None = Field(default=None, description="redis://host:port/db; unset turns the tier off")
    redis_ttl_s: float | None = Field(default=None, gt=0, description="expiry of chunks written to Redis")
    redis_timeout_s: float = Field(default=0.5, gt=0, description="socket timeout per Redis call")
    write_queue: int = Field(default=256, gt=0, description="background writes waiting for colder tiers")
    lookup_timeout_s: float = Field(default=1.0, gt=0,
                                    description="the scheduler counts a lookup slower than this as a miss")
    remote_budget_s: float = Field(default=0.02, gt=0,
                                   description="how long a lookup waits for Redis before counting its chunks missing")

    admin_port: int | None = Field(default=None, ge=1, le=65535,
                                   description="`kvbridge store stats | clear` reach the store here (plus the TP "
                                   "rank), on the connector's listen_host; unset: no admin listener")

    _sizes = field_validator("memory_bytes", "disk_bytes", mode="before")(parse_bytes)

    def build(self, mac_key: bytes | None = None) -> TieredStore:
        """The tiers; disk and Redis values carry a MAC under `mac_key` (storage/framing.py)."""
        tiers = []
        if self.memory_bytes:
            tiers.append(MemoryTier(self.memory_bytes))
        if self.disk_path:
            tiers.append(DiskTier(self.disk_path, self.disk_bytes, mac_key=mac_key))
        if self.redis_url:
            tiers.append(RedisTier(self.redis_url, self.redis_ttl_s, self.redis_timeout_s, mac_key=mac_key))
        if not tiers:
            raise ValueError("store: every tier is off (set memory_bytes, disk_path or redis_url)")
        return TieredStore(tiers, self.write_queue, self.remote_budget_s)

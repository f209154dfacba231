"""The connector's settings, read from vLLM's `kv_connector_extra_config` and validated.

A typo or a nonsense value stops vLLM at start-up with the field named, instead of a
transfer that fails at the first request.
"""
from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage.config import StoreConfig
from transfer.config_errors import ConfigError, format_errors


class ConnectorConfigError(ConfigError):
    """The connector's settings in vLLM's `kv_connector_extra_config` are unusable."""


class ConnectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instance_id: str = Field(default="", description="name in logs; defaults to role-hostname-pid")
    model_id: str = Field(default="", description="identity checked in the handshake; defaults to the model dir name")
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=5600, ge=0, le=65535, description="consumer handshake port (+ TP rank)")
    chunk_tokens: int = Field(default=256, gt=0, description="tokens per pushed chunk; rounded up to whole blocks")
    num_slots: int = Field(default=64, gt=0, description="consumer receive slots, one chunk each")
    slot_memory: Literal["device", "host"] = Field(
        default="device", description="where a GPU consumer keeps its slots: device memory, or pinned host memory "
        "(no VRAM taken; the scatter reads over PCIe)")
    staging_chunks: int = Field(default=16, gt=0, description="producer staging slots, one chunk each")
    lease_ttl_s: float = Field(default=5.0, gt=0, description="lease lifetime; renewed while a push is alive")
    write_margin_s: float = Field(default=1.0, ge=0, description="producer stops writing this long before the deadline")
    quarantine_s: float = Field(default=2.0, ge=0, description="expired slots rest this long before reuse")
    alloc_timeout_s: float = Field(default=5.0, gt=0, description="how long a producer waits for consumer slots")
    load_timeout_s: float = Field(default=10.0, gt=0, description="how long a consumer waits for KV that never starts")
    unclaimed_ttl_s: float = Field(default=30.0, gt=0, description="how long arrived KV waits for its decode request")
    idle_wait_ms: float = Field(default=20.0, gt=0, le=1000,
                                description="an idle decode engine sleeps this long per step while KV is on its way")
    checksum: bool = Field(default=False, description="crc32 per chunk, verified before scatter")
    gil_switch_interval_ms: float = Field(
        default=0.5, gt=0, le=100, description="the engine process's interpreter switch interval: kvbridge's "
        "threads must get the interpreter while the engine computes (5 ms, Python's default, delays every lease "
        "call and chunk notice by up to that much)")
    secret: str | None = Field(default=None, description="shared secret; or set KVBRIDGE_SECRET")
    metrics_port: int = Field(default=0, ge=0, le=65535,
                              description="Prometheus /metrics of the engine process (+ TP rank); 0 = off")
    store: StoreConfig | None = Field(default=None, description="tiered prefix store (producer); unset = off")

    @classmethod
    def from_extra(cls, extra: dict | None) -> ConnectorConfig:
        extra = dict(extra or {})
        extra.setdefault("secret", os.environ.get("KVBRIDGE_SECRET") or None)
        try:
            return cls.model_validate(extra)
        except ValidationError as e:
            raise ConnectorConfigError(format_errors(e, "kv_connector_extra_config")) from None

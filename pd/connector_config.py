"""The connector's settings, read from vLLM's `kv_connector_extra_config` and validated.

A typo or a nonsense value stops vLLM at start-up with the field named, instead of a
transfer that fails at the first request. The deployment secret is never a value here: this dict
is vLLM's command line, visible to every local user through `ps`. It is read at run time from the
environment variable `secret_env` or from `secret_file` (`secret()`).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from storage.config import StoreConfig, parse_bytes
from transfer.config_errors import ConfigError, format_errors
from transfer.credentials import DEFAULT_SECRET_ENV, CredentialError, load_secret
from transfer.push_token import PushPolicy, push_key
from transfer.ucx_error_handling import UcxErrorHandling


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
    window_slots: int = Field(default=0, ge=0, description="most consumer slots one transfer holds; a larger one "
                              "streams through that many, scattered as it lands. 0: the whole pool (fewer lets "
                              "small transfers flow beside a streaming one)")
    slot_memory: Literal["device", "host"] = Field(
        default="device", description="where a GPU consumer keeps its slots: device memory, or pinned host memory "
        "(no VRAM taken; the scatter reads over PCIe)")
    layer_groups: int = Field(default=4, ge=1, le=1024, description="a chunk the prefill's forward completes "
                              "leaves in up to this many parts (groups of whole layers), each once its layers "
                              "computed, so little is left to move when the forward ends; 1: whole chunks after the "
                              "forward")
    staging_chunks: int = Field(default=16, gt=0, description="producer staging slots, one chunk each")
    slot_pool_bytes: int | None = Field(default=None, gt=0, description="consumer slot pool as a size (e.g. 2GiB): "
                                        "as many slots as fit, at least one; wins over num_slots")
    staging_bytes: int | None = Field(default=None, gt=0, description="producer staging as a size: as many chunks as "
                                      "fit, at least one; wins over staging_chunks")
    lease_ttl_s: float = Field(default=5.0, gt=0, description="lease lifetime; renewed while a push is alive")
    write_margin_s: float = Field(default=1.0, ge=0, description="producer stops writing this long before the deadline")
    quarantine_s: float = Field(default=2.0, ge=0, description="slots of a lease that ended unfilled rest this long "
                                "after its producer's fence (or its word before the deadline) before reuse")
    fence_timeout_s: float = Field(default=30.0, ge=0, description="slots of a lease that ended unfilled, with no "
                                   "word from its producer in time, rest at least this long past its deadline unless "
                                   "the producer's fence comes first (writes a cut link held land when it comes back; "
                                   "longer for a producer whose TCP holds them longer: transfer/write_hold.py)")
    alloc_timeout_s: float = Field(default=5.0, gt=0, description="how long a producer waits for consumer slots")
    load_timeout_s: float = Field(default=10.0, gt=0, description="how long a consumer waits for KV that never starts")
    no_show_s: float = Field(default=0.25, gt=0, description="once the prefill node answered (as the router says, "
                             "a moment later), how long a consumer waits for its producer's first word (it asks for "
                             "slots before the forward) before the request follows its load-failure policy")
    handshake_grace_s: float = Field(default=4.0, gt=0, description="no_show_s becomes this while a producer's "
                                     "first handshake may be under way (it took up to 3 s on two loaded cores): "
                                     "one admitted within as long, or a prefill node the router first named as long "
                                     "ago (transfer/answered_notices.py), whose request also waits at least this "
                                     "long for its KV to start, whatever load_timeout_s")
    unclaimed_ttl_s: float = Field(default=30.0, gt=0, description="how long arrived KV waits for its decode request")
    idle_wait_ms: float = Field(default=20.0, gt=0, le=1000,
                                description="an idle decode engine sleeps this long per step while KV is on its way")
    checksum: bool = Field(default=False, description="crc32 per chunk, verified before scatter")
    ucx_error_handling: UcxErrorHandling = Field(
        default="peer", description="UCX's error handling on this node's NIXL agent, set alike on both roles "
        "(transfer/ucx_error_handling.py). peer: a dead peer fails its transfers; between processes on one host "
        "notifications go over TCP and each chunk's write waits for the consumer's next look. none: one host's "
        "prefill and decode talk through shared memory and a write completes when its copy does; measured on one "
        "host only, keep peer for a decode node on another host")
    gil_switch_interval_ms: float = Field(
        default=0.5, gt=0, le=100, description="the engine process's interpreter switch interval: kvbridge's "
        "threads must get the interpreter while the engine computes (5 ms, Python's default, delays every lease "
        "call and chunk notice by up to that much)")
    secret_env: str = Field(default=DEFAULT_SECRET_ENV, description="env var holding the deployment secret")
    secret_file: str | None = Field(default=None, description="file holding the deployment secret (wins over env)")
    insecure: bool = Field(default=False, description="let a routable listener start without a secret (warned "
                           "at every start) and push to any target unsigned; for isolated test networks only")
    push_allow: list[str] = Field(default_factory=list, description="consumer host:port a producer pushes to "
                                  "without a router-signed token (deployments without a router)")
    metrics_port: int = Field(default=0, ge=0, le=65535,
                              description="Prometheus /metrics of the engine process (+ TP rank); 0 = off")
    store: StoreConfig | None = Field(default=None, description="tiered prefix store (producer); unset = off")

    @field_validator("slot_pool_bytes", "staging_bytes", mode="before")
    @classmethod
    def _size(cls, v: int | str | None) -> int | None:
        return None if v is None else parse_bytes(v)

    def slots_for(self, chunk_bytes: int) -> int:
        """Consumer slots: `slot_pool_bytes` over one chunk's bytes when given as a size, else `num_slots`."""
        return max(1, self.slot_pool_bytes // chunk_bytes) if self.slot_pool_bytes else self.num_slots

    def staging_for(self, chunk_bytes: int) -> int:
        """Producer staging chunks: `staging_bytes` over one chunk's bytes when given as a size."""
        return max(1, self.staging_bytes // chunk_bytes) if self.staging_bytes else self.staging_chunks

    @model_validator(mode="before")
    @classmethod
    def _no_literal_secret(cls, data: object) -> object:
        if isinstance(data, dict) and "secret" in data:
            raise ValueError(f"secret: a secret in the config reaches vLLM's command line and logs; put it in the "
                             f"environment ({DEFAULT_SECRET_ENV}) or a file (secret_file) instead")
        return data

    def secret(self) -> bytes | None:
        """The deployment secret, read now from `secret_file` or `secret_env`; None when neither holds one."""
        try:
            return load_secret(self.secret_env, self.secret_file)
        except CredentialError as e:
            raise ConnectorConfigError(f"kv_connector_extra_config: {e}") from None

    def push_policy(self, secret: bytes | None) -> PushPolicy:
        return PushPolicy(push_key(secret) if secret is not None else None, frozenset(self.push_allow), self.insecure)

    @classmethod
    def from_extra(cls, extra: dict | None) -> ConnectorConfig:
        extra = dict(extra or {})
        try:
            return cls.model_validate(extra)
        except ValidationError as e:
            raise ConnectorConfigError(format_errors(e, "kv_connector_extra_config")) from None

"""Router configuration (YAML), validated by pydantic; errors name the file, path and field."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from transfer.config_errors import ConfigError, format_errors, load_yaml


class Instance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    url: str = Field(pattern=r"^https?://")


class DecodeInstance(Instance):
    kv_address: str = Field(pattern=r"^[\w.\-]+:\d+$", description="the decode connector's handshake host:port")


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["router"] = "router"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    model: str = Field(description="served model name clients must ask for")
    prefill: list[Instance] = Field(min_length=1)
    decode: list[DecodeInstance] = Field(min_length=1)
    policy: Literal["round_robin", "least_outstanding"] = "least_outstanding"
    on_prefill_failure: Literal["decode_prefills", "error"] = "decode_prefills"
    health_interval_s: float = Field(default=2.0, gt=0)
    health_timeout_s: float = Field(default=1.0, gt=0)
    unhealthy_after: int = Field(default=2, ge=1, description="consecutive failed checks before removal")
    request_timeout_s: float = Field(default=600.0, gt=0)
    max_tokens_limit: int = Field(default=32768, gt=0)
    trace_history: int = Field(default=1000, ge=0)
    kv_secret: str | None = Field(default=None, description="decode connectors' shared secret, for pool stats")

    @model_validator(mode="after")
    def _unique_names(self) -> RouterConfig:
        names = [i.name for i in self.prefill + self.decode]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"instance names must be unique, repeated: {sorted(dup)}")
        return self


def load_router_config(path: str | Path) -> RouterConfig:
    try:
        return RouterConfig.model_validate(load_yaml(path))
    except ValidationError as e:
        raise ConfigError(format_errors(e, str(path))) from None

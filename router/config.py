"""Router configuration (YAML), validated by pydantic; errors name the file, path and field."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from router.placement_config import PlacementConfig
from transfer.config_errors import ConfigError, format_errors, load_yaml
from transfer.control_auth import Credential
from transfer.credentials import DEFAULT_SECRET_ENV, CredentialError, load_secret
from transfer.push_token import push_key


class Instance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, description="the node as logs, metrics and the decode "
                      "connectors' notices name it")
    url: str = Field(pattern=r"^https?://")

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        if "@" in urlsplit(v).netloc:
            raise ValueError(f"url {v.split('@')[-1]!r}: credentials in a backend URL are not sent; give the "
                             "backends' key with backend_api_key_env or backend_api_key_file")
        return v


class DecodeInstance(Instance):
    kv_address: str = Field(pattern=r"^[A-Za-z0-9_](?:[\w\-]*)(?:\.[\w\-]+)*:\d{1,5}$",
                            description="the decode connector's handshake host:port (a host name or IPv4 address)")

    @field_validator("kv_address")
    @classmethod
    def _port_in_range(cls, v: str) -> str:
        if not 1 <= int(v.rsplit(":", 1)[1]) <= 65535:
            raise ValueError(f"kv_address {v!r}: the port must be between 1 and 65535")
        return v


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["router"] = "router"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    admin_host: str = Field(default="127.0.0.1", description="where /metrics and /debug listen when admin_port is set")
    admin_port: int | None = Field(default=None, ge=1, le=65535,
                                   description="serve /metrics and /debug here instead of on the API port")
    model: str = Field(description="served model name clients must ask for")
    prefill: list[Instance] = Field(min_length=1)
    decode: list[DecodeInstance] = Field(min_length=1)
    policy: Literal["round_robin", "least_outstanding", "prefix_aware"] = Field(
        default="least_outstanding", description="prefix_aware: nodes chosen by the placement cost model "
        "(prefix held, queue, transfer), which also decides between remote and local prefill (`placement`)")
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    on_prefill_failure: Literal["decode_prefills", "error"] = "decode_prefills"
    decode_dispatch: Literal["auto", "with_prefill", "after_prefill"] = Field(
        default="auto", description="when a disaggregated request's decode leg is sent. with_prefill: beside the "
        "prefill leg; the decode node admits it at once and takes the KV the step it lands, but vLLM's engine "
        "steps without pause while its only request waits for KV (measured on a 2-core box: an idle decode node "
        "spinning that way, its threads free to run on the prefill's core, slowed that prefill by 10-30 %; with "
        "each node's threads kept on its own core, by 2-5 %). after_prefill: once the prefill leg "
        "answered, as vLLM's NixlConnector proxy does; the pushed KV waits in the decode node's slots, and the "
        "decode node admits the request only then. auto: when the chosen decode node has nothing of ours running, "
        "`decode_lead_s` before the prefill leg's predicted end (from the placement model's learned rates; earlier "
        "when recent legs answered sooner than predicted, decode_lead_cover), or "
        "when it answered if that comes first: the decode node admits the request while the prompt's last "
        "layers compute and spins only that long; with_prefill when it is busy (its steps run anyway)")
    decode_lead_s: float = Field(
        default=0.15, ge=0, description="auto dispatch: how long before an idle decode node's prefill leg is "
        "predicted to end its decode leg is sent. Measured here: a decode node took 40-130 ms from its leg's "
        "arrival to its first token when the KV was already there")
    decode_lead_cover: float = Field(
        default=0.9, ge=0, lt=1, description="auto dispatch: the share of prefill legs whose decode leg should go "
        "before they answer. The router keeps the last 64 legs' actual / predicted times and sends the decode leg "
        "earlier by what the legs at the early edge (this quantile from below: 1 - cover) ran short of their "
        "prediction, at most half of it; 0 keeps decode_lead_s alone (router/dispatch_lead.py)")
    health_interval_s: float = Field(default=2.0, gt=0, description="pause between two health checks of a node; "
                                     "each node is checked on its own schedule")
    health_timeout_s: float = Field(default=1.0, gt=0, description="how long /health (and, for a decode node, its "
                                    "connector's pool probe) may take before the check fails")
    unhealthy_after: int = Field(default=2, ge=1, description="consecutive failed health checks before removal")
    abandon_after_s: float = Field(default=3.0, ge=0, description="a node down by its health checks this long "
                                   "has each request that has waited on it as long ended (retried if nothing was "
                                   "sent); a stream whose events come less than this apart goes on")
    down_after_failures: int = Field(default=3, ge=2, description="consecutive failed requests before removal; "
                                     "one failed request only makes an instance suspect")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    first_byte_timeout_s: float = Field(default=600.0, gt=0, description="streamed: until the decode's first "
                                        "event (queueing + prefill); the prefill leg: until its 1-token answer")
    read_timeout_s: float = Field(default=300.0, gt=0, description="streamed: longest silence between two events")
    client_write_timeout_s: float = Field(default=60.0, gt=0, description="streamed: longest a client may leave the "
                                          "answer unread (its connection's buffers full) before it counts as gone and "
                                          "both legs are cancelled")
    unstreamed_timeout_s: float = Field(default=7200.0, gt=0, description="a non-streamed answer comes whole, "
                                        "so this must fit a whole generation (32k tokens at 5 tok/s)")
    max_inflight_total: int | None = Field(default=2048, ge=1, description="past it: 429 with Retry-After")
    max_inflight_per_instance: int | None = Field(default=512, ge=1, description="per prefill or decode instance")
    retry_after_s: int = Field(default=1, ge=0)
    api_key_env: str | None = Field(default=None, description="env var holding the key clients must present")
    api_key_file: Path | None = Field(default=None, description="file holding the key clients must present")
    backend_api_key_env: str | None = Field(default=None, description="env var with the backends' --api-key; "
                                            "unset: the client's Authorization header passes through")
    backend_api_key_file: Path | None = None
    max_tokens_limit: int | None = Field(default=None, gt=0, description="refuse a max_tokens above this; unset: "
                                         "vLLM caps max_tokens to what the model's context leaves, as it does alone")
    trace_history: int = Field(default=1000, ge=0)
    kv_secret_env: str = Field(default=DEFAULT_SECRET_ENV, description="env var holding the deployment secret "
                               "(signs control messages to decode connectors and prefill push targets)")
    kv_secret_file: Path | None = Field(default=None, description="file holding it instead (wins over the env var)")
    nodes_file: Path | None = Field(default=None, description="where nodes added or drained away at run time are "
                                    "kept, so a restarted router serves the same nodes (router/node_file.py)")
    push_token_ttl_s: float = Field(default=60.0, gt=0, description="how long a prefill leg's signed push target "
                                    "stays valid: it must cover the leg's wait in the prefill node's queue")

    @model_validator(mode="after")
    def _unique_names(self) -> RouterConfig:
        names = [i.name for i in self.prefill + self.decode]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"instance names must be unique, repeated: {sorted(dup)}")
        if self.api_key_env and self.api_key_file:
            raise ValueError("set api_key_env or api_key_file, not both")
        if self.backend_api_key_env and self.backend_api_key_file:
            raise ValueError("set backend_api_key_env or backend_api_key_file, not both")
        return self

    @cached_property
    def _kv_secret(self) -> bytes | None:
        try:
            return load_secret(self.kv_secret_env, self.kv_secret_file)
        except CredentialError as e:
            raise ConfigError(f"router kv secret: {e}") from None

    @cached_property
    def kv_cred(self) -> Credential:
        """How the router signs its control messages to decode connectors (read once, at start)."""
        return Credential("router", self._kv_secret)

    @cached_property
    def push_key(self) -> bytes | None:
        """The key prefill push targets are signed with; None without a deployment secret."""
        return push_key(self._kv_secret) if self._kv_secret is not None else None


def load_router_config(path: str | Path) -> RouterConfig:
    try:
        return RouterConfig.model_validate(load_yaml(path))
    except ValidationError as e:
        raise ConfigError(format_errors(e, str(path))) from None

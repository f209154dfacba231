"""YAML configs for vLLM roles (prefill / decode / both / aggregated) and for a whole deployment graph.

A role file turns into one stock-vLLM command line; nothing in vLLM is patched. prefill, decode
and both run kvbridge's connector. aggregated runs none of kvbridge: the plain server PD answers
are compared against, or, with a --kv-transfer-config in its vllm_args, vLLM with another connector
(the benches' NixlConnector peer). Validation errors name the file and the field.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pd.connector_config import ConnectorConfig
from router.config import RouterConfig
from transfer.config_errors import ConfigError, format_errors, load_yaml
from transfer.credentials import ADMIN_RISK, LEASE_RISK, CredentialError, require_secret

KV_ROLE = {"prefill": "kv_producer", "decode": "kv_consumer", "both": "kv_both"}
KV_TRANSFER_FLAG = "--kv-transfer-config"
# whole words of the name: HF_TOKEN and MY_SECRET are secrets, TOKENIZERS_PARALLELISM is not
SECRET_NAME = re.compile(r"(^|_)(SECRET|TOKEN|PASSWORD|PASSWD|API_?KEY|PRIVATE_KEY)(_|$)", re.IGNORECASE)


def no_secret_in_env(env: dict[str, str]) -> dict[str, str]:
    """A config file's `env` holds no secret: it is plain text (and a ConfigMap once rendered for Kubernetes)."""
    named = sorted(k for k in env if SECRET_NAME.search(k))
    if named:
        raise ValueError(f"{', '.join(named)} {'looks like a secret' if len(named) == 1 else 'look like secrets'}, "
                         "which a config file must not hold: export it in the environment `kvbridge up` runs in "
                         "(every role inherits it), or put it in a Kubernetes Secret")
    return env


class RoleConfig(BaseModel):
    """One stock-vLLM server: its role, the settings of its command line and the environment it runs in."""
    model_config = ConfigDict(extra="forbid")
    role: Literal["prefill", "decode", "both", "aggregated"]
    name: str
    model: str
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    load_failure_policy: Literal["recompute", "fail"] = "recompute"
    vllm_args: list[str] = Field(default_factory=lambda: ["--enforce-eager"])
    env: dict[str, str] = Field(default_factory=dict)
    connector: ConnectorConfig = Field(default_factory=ConnectorConfig)
    _env = field_validator("env")(no_secret_in_env)

    @model_validator(mode="after")
    def _one_connector(self) -> RoleConfig:
        """kvbridge's roles own --kv-transfer-config; aggregated has no kvbridge settings to take."""
        if self.role == "aggregated":
            unused = sorted({"connector", "load_failure_policy"} & self.model_fields_set)
            if unused:
                raise ValueError(f"role aggregated runs no kvbridge connector; remove {unused}")
        elif any(a.split("=")[0] == KV_TRANSFER_FLAG for a in self.vllm_args):
            raise ValueError(f"vllm_args must not hold {KV_TRANSFER_FLAG}: role {self.role} sets kvbridge's "
                             "connector (use role: aggregated to run vLLM with another connector)")
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def kv_address(self) -> str:
        """The consumer handshake address producers push to (decode and both roles)."""
        return f"{self.connector.listen_host}:{self.connector.listen_port}"

    def listener_warning(self, env: dict[str, str]) -> str:
        """Before vLLM starts: refuse (ConfigError) a listener on a routable address with no secret in `env` or
        secret_file unless `insecure: true` — the consumer endpoint of a decode, the store admin of a producer — as the
        connector would once vLLM loaded it; the warnings to print in that case, else ''."""
        c = self.connector
        listeners = ([(f"{self.name}'s kvbridge connector", LEASE_RISK)] if self.role in ("decode", "both") else []) + \
                    ([(f"{self.name}'s store admin (port {c.store.admin_port} + TP rank)", ADMIN_RISK)]
                     if self.role in ("prefill", "both") and c.store and c.store.admin_port else [])
        if not listeners:
            return ""
        try:
            secret = c.secret() if c.secret_file else (env.get(c.secret_env) or None)
            return "\n".join(filter(None, (require_secret(c.listen_host, secret, c.insecure, what, risk)
                                            for what, risk in listeners)))
        except (CredentialError, ConfigError) as e:
            raise ConfigError(f"{self.name}: {e}") from None

    def vllm_command(self) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--served-model-name", self.served_model_name, "--host", self.host, "--port", str(self.port)]
        if self.role == "aggregated":
            return cmd + self.vllm_args
        extra = self.connector.model_dump(exclude_defaults=True)
        extra.setdefault("instance_id", self.name)
        kv = {"kv_connector": "KVBridgeConnector", "kv_connector_module_path": "pd.connector",
              "kv_role": KV_ROLE[self.role], "kv_load_failure_policy": self.load_failure_policy,
              "kv_connector_extra_config": extra}
        return cmd + [KV_TRANSFER_FLAG, json.dumps(kv), *self.vllm_args]


class HostLink(BaseModel):
    """How every link between two hosts of a multi-host graph is shaped (each direction)."""
    model_config = ConfigDict(extra="forbid")
    rate: str | None = Field(default=None, pattern=r"^\d+(\.\d+)?[kmg]?bit$", description="e.g. 10gbit")
    delay: str | None = Field(default=None, pattern=r"^\d+(\.\d+)?(us|ms|s)$", description="e.g. 50us (netem)")
    loss: float = Field(default=0.0, ge=0, lt=100, description="percent of packets dropped (netem)")


class DeploymentConfig(BaseModel):
    """The graph: which role files make up one deployment (Dynamo-style), checked for consistency."""
    model_config = ConfigDict(extra="forbid")
    role: Literal["deployment"] = "deployment"
    name: str
    prefill: list[str] = Field(min_length=1)
    decode: list[str] = Field(min_length=1)
    router: str
    env: dict[str, str] = Field(default_factory=dict)
    metrics_port: int | None = Field(default=None, ge=1, le=65535, description="`kvbridge up` serves its "
                                     "restart counts here (127.0.0.1); `kvbridge status` reads them")
    hosts: dict[str, list[str]] = Field(default_factory=dict, description="host -> the role names it runs "
                                        "('router' for the router); set: `kvbridge up` runs each host in a "
                                        "network namespace of its own on this box (launch/placement.py)")
    link: HostLink = Field(default_factory=HostLink)
    base_dir: Path = Path(".")
    _env = field_validator("env")(no_secret_in_env)

    @model_validator(mode="after")
    def _files_exist(self) -> DeploymentConfig:
        missing = [p for p in self.prefill + self.decode + [self.router] if not (self.base_dir / p).is_file()]
        if missing:
            raise ValueError(f"role files not found (relative to {self.base_dir}): {missing}")
        return self

    def host_of(self) -> dict[str, str]:
        """role name -> its host, from `hosts`; each role on exactly one host (checked in load())."""
        return {role: host for host, roles in self.hosts.items() for role in roles}

    def load(self, check_router: bool = True) -> tuple[list[RoleConfig], list[RoleConfig], RouterConfig]:
        """The role files and the router file, checked to describe one deployment: each file of the kind its
        list needs, one model name, each placed once, and (`check_router`: for a deployment that runs the router
        file as written) the router's instances the graph's roles."""
        pre = [self._role(p, ("prefill", "both")) for p in self.prefill]
        dec = [self._role(p, ("decode", "both")) for p in self.decode]
        router = load_config(self.base_dir / self.router)
        if not isinstance(router, RouterConfig):
            raise ConfigError(f"deployment {self.name}: router file {self.router} is a role file "
                              f"(role: {router.role}), not a router file (role: router)")
        served = {c.served_model_name for c in pre + dec} | {router.model}
        if len(served) != 1:
            raise ConfigError(f"deployment {self.name}: every role must serve the same model name, got {served}")
        if self.hosts:
            names = sorted([c.name for c in pre + dec] + ["router"])
            placed = sorted(r for roles in self.hosts.values() for r in roles)
            if placed != names:
                raise ConfigError(f"deployment {self.name}: hosts must place each of {names} exactly once, "
                                  f"placed: {placed}")
        wrong = router_mismatches(router, pre, dec) if check_router else []
        if wrong:
            raise ConfigError(f"deployment {self.name}: router file {self.router} does not send to the graph's "
                              "roles (the router would wait for nodes that are not there):\n  " + "\n  ".join(wrong))
        return pre, dec, router

    def _role(self, path: str, kinds: tuple[str, ...]) -> RoleConfig:
        role = load_config(self.base_dir / path)
        if not isinstance(role, RoleConfig) or role.role not in kinds:
            got = role.role if isinstance(role, RoleConfig) else ("router" if isinstance(role, RouterConfig)
                                                                   else "deployment")
            raise ConfigError(f"deployment {self.name}: {path} is role {got}; this list takes role "
                              f"{' or '.join(kinds)}")
        return role


def _reaches(target: str, listen: str) -> bool:
    """Whether host:port `target` (a URL's or a kv_address) can be the listener `listen` (host:port): the same
    port, and the same host, any host for a wildcard listener, or loopback names for a loopback one."""
    (t_host, _, t_port), (l_host, _, l_port) = target.rpartition(":"), listen.rpartition(":")
    if t_port != l_port:
        return False
    loopback = {t_host, l_host} <= {"localhost", "127.0.0.1", "::1", "[::1]"}
    return t_host == l_host or l_host in ("0.0.0.0", "::", "[::]") or loopback


def router_mismatches(router: RouterConfig, prefill: list[RoleConfig], decode: list[RoleConfig]) -> list[str]:
    """How the router's instance lists differ from the roles' own listeners (empty when they agree)."""
    out = []
    for kind, roles, insts in (("prefill", prefill, router.prefill), ("decode", decode, router.decode)):
        want = {r.name: (f"{r.host}:{r.port}", r.kv_address if kind == "decode" else None) for r in roles}
        have = {i.name: (urlsplit(i.url).netloc, getattr(i, "kv_address", None)) for i in insts}
        out += [f"{kind} {n}: in the graph, not in the router file" for n in sorted(want.keys() - have.keys())]
        out += [f"{kind} {n}: in the router file, not in the graph" for n in sorted(have.keys() - want.keys())]
        for n in sorted(want.keys() & have.keys()):
            if not _reaches(have[n][0], want[n][0]):
                out.append(f"{kind} {n}: the router sends to {have[n][0]}, the role serves {want[n][0]}")
            if want[n][1] is not None and not _reaches(have[n][1], want[n][1]):
                out.append(f"{kind} {n}: the router's kv_address is {have[n][1]}, the role listens on {want[n][1]}")
    return out


def load_config(path: str | Path) -> RoleConfig | RouterConfig | DeploymentConfig:
    data = load_yaml(path)
    role = data.get("role")
    if role is None:  # else a router or graph file would be judged as a vLLM role, field by field
        raise ConfigError(f"{path}: role: missing; one of prefill, decode, both, aggregated, router, deployment")
    model = {"router": RouterConfig, "deployment": DeploymentConfig}.get(role, RoleConfig)
    if model is DeploymentConfig:
        data.setdefault("base_dir", str(Path(path).parent))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, str(path))) from None

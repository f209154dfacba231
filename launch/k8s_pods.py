"""Kubernetes pod pieces shared by every kvbridge workload: labels, probes, environment, scrape annotations.

Plain dicts in the shape of the Kubernetes API, so `kvbridge render k8s` needs nothing beyond pyyaml and
the output is what `kubectl apply -f` reads. launch/k8s_render.py assembles them into whole objects.
"""
from __future__ import annotations

import re

from transfer.config_errors import ConfigError

PART_OF = "kvbridge"
SECRET_ENV = "KVBRIDGE_SECRET"   # what pd/connector_config.py and router/config.py read the shared secret from
SECRET_KEY = "secret"
# The router's keys, when its file sets them: rendered as these env vars, from these keys of the same Secret
API_KEY_ENV, API_KEY_KEY = "KVBRIDGE_ROUTER_API_KEY", "api-key"
BACKEND_KEY_ENV, BACKEND_KEY_KEY = "KVBRIDGE_VLLM_API_KEY", "backend-api-key"
VLLM_KEY_ENV = "VLLM_API_KEY"    # vLLM's own --api-key, from the environment
CONFIG_DIR = "/etc/kvbridge"
WORK_DIR = "/srv/kvbridge"       # relative paths in role files (model, store.disk_path) resolve here
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def dns_name(*parts: str) -> str:
    """A Kubernetes object name from deployment and role names; a name that cannot be one is refused, not
    silently mangled, because Services are addressed by it (the router's config names them)."""
    name = "-".join(parts).lower().replace("_", "-").replace(".", "-")
    if len(name) > 63 or not _DNS_LABEL.match(name):
        raise ConfigError(f"'{name}' (from {parts}) is not a Kubernetes DNS label: lowercase letters, digits and "
                          "'-', at most 63 characters; rename the deployment or role")
    return name


def labels(deployment: str, component: str, role_name: str) -> dict[str, str]:
    """`component` (prefill, decode, both, router) is what topology spread groups by; `role_name` picks
    one workload's pods for its Service."""
    return {"app.kubernetes.io/name": PART_OF, "app.kubernetes.io/instance": deployment,
            "app.kubernetes.io/component": component, "kvbridge/role": role_name}


def selector(all_labels: dict[str, str]) -> dict[str, str]:
    return {k: all_labels[k] for k in ("app.kubernetes.io/instance", "kvbridge/role")}


def health_probes(port_name: str, alive_by_tcp: bool = False) -> dict[str, dict]:
    """Startup allows a long model load (15 min); after it, readiness drops a pod from Services within
    ~10 s and liveness restarts a process that stopped answering /health for 30 s. `alive_by_tcp` is for
    the router, whose /health is 503 while no decode node is up: that is its backends' state, not its own,
    so only its readiness follows /health and a decode outage never restarts it."""
    get = {"httpGet": {"path": "/health", "port": port_name}}
    alive = {"tcpSocket": {"port": port_name}} if alive_by_tcp else get
    return {"startupProbe": {**alive, "periodSeconds": 10, "failureThreshold": 90, "timeoutSeconds": 5},
            "readinessProbe": {**get, "periodSeconds": 5, "failureThreshold": 2, "timeoutSeconds": 3},
            "livenessProbe": {**alive, "periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 5}}


def env_list(plain: dict[str, str], secret_name: str, secret_keys: dict[str, str]) -> list[dict]:
    """The role's and deployment's env, POD_IP from the downward API (a decode connector listens on it),
    and each env var of `secret_keys` from that key of the Secret: no secret's value appears in a manifest."""
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}
            for k, key in secret_keys.items()]
    taken = {e["name"] for e in env}
    return env + [{"name": k, "value": str(v)} for k, v in sorted(plain.items()) if k not in taken]


def scrape_annotations(port: int, config_hash: str) -> dict[str, str]:
    """prometheus.io/* is what Prometheus' kubernetes_sd examples and most charts scrape by; the config
    hash rolls the pods when a role file changes."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics",
            "kvbridge/config-sha256": config_hash}


def spread(deployment: str, component: str) -> list[dict]:
    """Replicas of one kind (all prefill, all decode) spread over nodes, then zones; ScheduleAnyway so a
    small cluster still schedules them all."""
    match = {"matchLabels": {"app.kubernetes.io/instance": deployment, "app.kubernetes.io/component": component}}
    return [{"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": match}
            for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")]


def anti_affinity(deployment: str, component: str) -> dict:
    """Preferred, not required: two decode pods on one GPU node still run when nothing else fits."""
    term = {"labelSelector": {"matchLabels": {"app.kubernetes.io/instance": deployment,
                                              "app.kubernetes.io/component": component}},
            "topologyKey": "kubernetes.io/hostname"}
    return {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "podAffinityTerm": term}]}}


def tensor_parallel(vllm_args: list[str]) -> int:
    """GPUs a role needs: vLLM's --tensor-parallel-size (or -tp) times --pipeline-parallel-size."""
    sizes = {"tp": 1, "pp": 1}
    flags = {"--tensor-parallel-size": "tp", "-tp": "tp", "--pipeline-parallel-size": "pp", "-pp": "pp"}
    for i, arg in enumerate(vllm_args):
        key, _, value = arg.partition("=")
        if key in flags:
            raw = value or (vllm_args[i + 1] if i + 1 < len(vllm_args) else "")
            if not raw.isdigit():
                raise ConfigError(f"vllm_args: {key} needs a number, got '{raw}'")
            sizes[flags[key]] = int(raw)
    return sizes["tp"] * sizes["pp"]

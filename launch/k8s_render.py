"""`kvbridge render k8s`: the deployment graph `kvbridge up` runs, as Kubernetes manifests.

The same role files go into a ConfigMap and each pod runs `kvbridge serve` on its own file, so the two
targets cannot drift. What differs in a cluster is rewritten here, nowhere else: servers bind 0.0.0.0, a
decode connector listens on its pod IP (downward API, passed as --listen-host), and the router's instance
lists are built from the graph with Service names (a headless Service resolves to the pod IP, which is
where NIXL pushes land). The shared secret is referenced from a Secret and refused inline.
"""
from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

import yaml

from launch import k8s_pods as pods
from launch.role_config import DeploymentConfig, RoleConfig, load_config
from router.config import RouterConfig
from transfer.config_errors import ConfigError

class _Dumper(yaml.SafeDumper):
    """No anchors (objects share label dicts) and role files as literal blocks, so a reader of the
    ConfigMap sees the YAML they wrote."""

    def ignore_aliases(self, data: object) -> bool:
        return True


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                             style="|" if "\n" in s else None))


def _dump(data: object) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


GRACE_S = 60       # in-flight generations get this long after SIGTERM
PRE_STOP_S = 10    # endpoints and the router's health checks notice the pod is going before it stops


def _cluster_role(role: RoleConfig) -> dict:
    """The role file as its pod runs it: bound to the pod, the deployment secret read from the Secret's env var
    (a `secret_file` of the local file is not there in the pod)."""
    data = role.model_dump(mode="json", exclude_unset=True)
    data.update(role=role.role, host="0.0.0.0")
    connector = data.setdefault("connector", {})
    connector.pop("listen_host", None)   # the pod IP, given at start by --listen-host
    connector.pop("secret_file", None)
    connector["secret_env"] = pods.SECRET_ENV
    return data


def _router_secrets(router: RouterConfig) -> dict[str, str]:
    """Env var -> Secret key for the router: the deployment secret, and its two API keys when its file sets them."""
    keys = {pods.SECRET_ENV: pods.SECRET_KEY}
    if router.api_key_env or router.api_key_file:
        keys[pods.API_KEY_ENV] = pods.API_KEY_KEY
    if router.backend_api_key_env or router.backend_api_key_file:
        keys[pods.BACKEND_KEY_ENV] = pods.BACKEND_KEY_KEY
    return keys


def _cluster_router(router: RouterConfig, prefill: list[RoleConfig], decode: list[RoleConfig],
                    dep: str) -> dict:
    data = router.model_dump(mode="json", exclude_unset=True)
    data.update(role="router", host="0.0.0.0", admin_host="0.0.0.0", kv_secret_env=pods.SECRET_ENV)
    for key in ("kv_secret_file", "api_key_file", "backend_api_key_file", "api_key_env", "backend_api_key_env"):
        data.pop(key, None)  # the pod has the Secret's env vars, not the local files or variable names
    keys = _router_secrets(router)
    if pods.API_KEY_ENV in keys:
        data["api_key_env"] = pods.API_KEY_ENV
    if pods.BACKEND_KEY_ENV in keys:
        data["backend_api_key_env"] = pods.BACKEND_KEY_ENV
    data["prefill"] = [{"name": r.name, "url": f"http://{pods.dns_name(dep, r.name)}:{r.port}"} for r in prefill]
    data["decode"] = [{"name": r.name, "url": f"http://{pods.dns_name(dep, r.name)}:{r.port}",
                       "kv_address": f"{pods.dns_name(dep, r.name)}:{r.connector.listen_port}"} for r in decode]
    return data


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _volumes(role: RoleConfig | None, config_map: str, key: str) -> tuple[list[dict], list[dict]]:
    """The role's file, a memory-backed /dev/shm (vLLM's workers share tensors through it), and an
    emptyDir at the store's disk path so the disk tier survives a container restart."""
    vols = [{"name": "config", "configMap": {"name": config_map, "items": [{"key": key, "path": key}]}}]
    mounts = [{"name": "config", "mountPath": pods.CONFIG_DIR, "readOnly": True}]
    if role is None:
        return vols, mounts
    vols.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
    mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    store = role.connector.store
    if store and store.disk_path:
        vols.append({"name": "store", "emptyDir": {"sizeLimit": str(store.disk_bytes)}})
        mounts.append({"name": "store", "mountPath": str(PurePosixPath(pods.WORK_DIR) / store.disk_path)})
    return vols, mounts


def _workload(dep: DeploymentConfig, name: str, component: str, container: dict, ports: list[dict],
              metrics_port: int, config_text: str, role: RoleConfig | None) -> list[dict]:
    """A Deployment of one replica (one role file is one instance) and its Service."""
    obj = pods.dns_name(dep.name, name)
    lab = pods.labels(dep.name, component, name)
    vols, mounts = _volumes(role, pods.dns_name(dep.name, "roles"), f"{name}.yaml")
    container.update(ports=[{"name": p["name"], "containerPort": p["port"]} for p in ports],
                     volumeMounts=mounts, workingDir=pods.WORK_DIR,
                     lifecycle={"preStop": {"sleep": {"seconds": PRE_STOP_S}}},
                     **pods.health_probes("http", alive_by_tcp=role is None))
    spec = {"containers": [container], "volumes": vols, "terminationGracePeriodSeconds": GRACE_S,
            "topologySpreadConstraints": pods.spread(dep.name, component),
            "affinity": pods.anti_affinity(dep.name, component)}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": obj, "labels": lab},
                  "spec": {"replicas": 1, "selector": {"matchLabels": pods.selector(lab)},
                           # a GPU role never needs two pods (and two GPUs) at once during a rollout
                           "strategy": {"type": "Recreate" if role else "RollingUpdate"},
                           "template": {"metadata": {"labels": lab, "annotations": pods.scrape_annotations(
                               metrics_port, _sha(config_text))}, "spec": spec}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": obj, "labels": lab},
               "spec": {"selector": pods.selector(lab), "publishNotReadyAddresses": False,
                        "ports": [{"name": p["name"], "port": p["port"], "targetPort": p["name"]} for p in ports]}}
    if role:   # headless: the name resolves to the pod IP, which the decode connector's slots are reached at
        service["spec"]["clusterIP"] = "None"
    return [deployment, service]


def _vllm_docs(dep: DeploymentConfig, role: RoleConfig, text: str, image: str, secret: str,
               router: RouterConfig) -> list[dict]:
    """A vLLM role's Deployment and Service; with a backend key in the router file, vLLM asks for it (its own
    VLLM_API_KEY, from the Secret)."""
    ports = [{"name": "http", "port": role.port}]
    if role.role in ("decode", "both"):
        ports.append({"name": "kv", "port": role.connector.listen_port})
    if role.connector.metrics_port:
        ports.append({"name": "metrics", "port": role.connector.metrics_port})
    keys = {pods.SECRET_ENV: pods.SECRET_KEY}
    if pods.BACKEND_KEY_ENV in _router_secrets(router):
        keys[pods.VLLM_KEY_ENV] = pods.BACKEND_KEY_KEY
    gpus = str(pods.tensor_parallel(role.vllm_args))
    container = {"name": "vllm", "image": image,
                 "args": ["serve", f"{pods.CONFIG_DIR}/{role.name}.yaml", "--listen-host", "$(POD_IP)"],
                 "command": ["kvbridge"], "env": pods.env_list({**dep.env, **role.env}, secret, keys),
                 "resources": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}}}
    return _workload(dep, role.name, role.role, container, ports, role.connector.metrics_port or role.port,
                     text, role)


def _router_docs(dep: DeploymentConfig, router: RouterConfig, text: str, image: str, secret: str) -> list[dict]:
    ports = [{"name": "http", "port": router.port}]
    if router.admin_port:
        ports.append({"name": "admin", "port": router.admin_port})
    keys = _router_secrets(router)
    container = {"name": "router", "image": image, "command": ["kvbridge"],
                 "args": ["router", "--config", f"{pods.CONFIG_DIR}/router.yaml"],
                 "env": pods.env_list(dep.env, secret, keys),
                 "resources": {"requests": {"cpu": "1", "memory": "512Mi"}}}
    return _workload(dep, "router", "router", container, ports, router.admin_port or router.port, text, None)


def render(path: str | Path, image: str, secret_name: str | None = None) -> dict[str, list[dict]]:
    """File name -> the Kubernetes objects it holds, for the graph at `path`."""
    dep = load_config(path)
    if not isinstance(dep, DeploymentConfig):
        raise ConfigError(f"{path}: expected role: deployment")
    prefill, decode, router = dep.load(check_router=False)  # its lists come from the graph
    secret = secret_name or pods.dns_name(dep.name, "kvbridge")
    texts = {f"{r.name}.yaml": _dump(_cluster_role(r)) for r in prefill + decode}
    texts["router.yaml"] = _dump(_cluster_router(router, prefill, decode, dep.name))
    if len(texts) != len(prefill) + len(decode) + 1:
        raise ConfigError(f"deployment {dep.name}: role names must be unique and not 'router'")
    out = {"configmap.yaml": [{"apiVersion": "v1", "kind": "ConfigMap",
                               "metadata": {"name": pods.dns_name(dep.name, "roles"),
                                            "labels": {"app.kubernetes.io/name": pods.PART_OF,
                                                       "app.kubernetes.io/instance": dep.name}},
                               "data": texts}]}
    for r in prefill + decode:
        out[f"{r.name}.yaml"] = _vllm_docs(dep, r, texts[f"{r.name}.yaml"], image, secret, router)
    out["router.yaml"] = _router_docs(dep, router, texts["router.yaml"], image, secret)
    return out


def write(manifests: dict[str, list[dict]], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, docs in manifests.items():
        (out / name).write_text(yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False))
        written.append(out / name)
    return written

"""`kvbridge render k8s`: the repository's graph and a 2 prefill + 2 decode graph become manifests that pass
Kubernetes' own OpenAPI schemas offline (kubernetes-validate, strict: unknown fields fail too), and that
carry the same role files the local deployment runs."""
from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from launch.cli import main
from launch.k8s_pods import tensor_parallel
from launch.k8s_render import render
from launch.role_config import RoleConfig, load_config
from router.config import RouterConfig
from transfer.config_errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]   # 1.30: first with preStop sleep on by default


def _role_file(dir: Path, source: str, name: str, port: int, **connector: object) -> str:
    data = yaml.safe_load((ROOT / "configs" / source).read_text())
    data.update(name=name, port=port)
    data.setdefault("connector", {}).update(connector)
    (dir / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return f"{name}.yaml"


def _two_by_two(dir: Path) -> Path:
    """2 prefill + 2 decode, the second decode on two GPUs (tensor parallel)."""
    prefill = [_role_file(dir, "prefill.yaml", f"prefill-{i}", 8100 + i, metrics_port=9181 + i) for i in range(2)]
    decode = [_role_file(dir, "decode.yaml", f"decode-{i}", 8200 + i, listen_port=5600 + 10 * i) for i in range(2)]
    d1 = yaml.safe_load((dir / "decode-1.yaml").read_text())
    d1["vllm_args"] += ["--tensor-parallel-size", "2"]
    (dir / "decode-1.yaml").write_text(yaml.safe_dump(d1))
    (dir / "router.yaml").write_text((ROOT / "configs" / "router.yaml").read_text())
    graph = {"role": "deployment", "name": "pd-2x2", "prefill": prefill, "decode": decode, "router": "router.yaml",
             "env": {"HF_HOME": "/models"}}
    (dir / "deployment.yaml").write_text(yaml.safe_dump(graph))
    return dir / "deployment.yaml"


@pytest.fixture(params=["repository", "2p2d"])
def graph(request, tmp_path) -> Path:
    return ROOT / "configs" / "deployment.yaml" if request.param == "repository" else _two_by_two(tmp_path)


def _objects(path: Path, out: Path) -> list[dict]:
    main(["render", "k8s", str(path), "-o", str(out)])
    return [d for f in sorted(out.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]


def _of(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_object_passes_the_kubernetes_schema(graph, tmp_path, version):
    objects = _objects(graph, tmp_path / "out")
    assert {o["kind"] for o in objects} == {"ConfigMap", "Deployment", "Service"}
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_refuses_a_broken_manifest(tmp_path):
    """The schema check above can fail: a misspelled probe field and a string replica count are named."""
    dep = _of(_objects(ROOT / "configs" / "deployment.yaml", tmp_path), "Deployment")["local-tiny-decode-0"]
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)
    dep["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=False)


def test_one_gpu_workload_per_role_running_its_own_role_file(graph, tmp_path):
    objects = _objects(graph, tmp_path / "out")
    dep = load_config(graph)
    prefill, decode, _ = dep.load(check_router=False)
    files = next(iter(_of(objects, "ConfigMap").values()))["data"]
    workloads = _of(objects, "Deployment")
    assert len(workloads) == len(prefill) + len(decode) + 1
    for role in prefill + decode:
        w = workloads[f"{dep.name}-{role.name}"]
        pod = w["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["args"][:2] == ["serve", f"/etc/kvbridge/{role.name}.yaml"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == str(tensor_parallel(role.vllm_args))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
        assert pod["terminationGracePeriodSeconds"] > 0 and c["lifecycle"]["preStop"]
        assert pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"][
            "app.kubernetes.io/component"] == role.role
        # the ConfigMap holds the same role, validated by the same loader; only the bind address differs
        (tmp_path / "r.yaml").write_text(files[f"{role.name}.yaml"])
        in_cluster = load_config(tmp_path / "r.yaml")
        assert isinstance(in_cluster, RoleConfig) and in_cluster.host == "0.0.0.0"
        assert in_cluster.model_copy(update={"host": role.host, "connector": role.connector}) == role
        assert in_cluster.connector.model_dump(exclude={"listen_host"}) == role.connector.model_dump(
            exclude={"listen_host"})
        scrape = w["spec"]["template"]["metadata"]["annotations"]
        assert scrape["prometheus.io/port"] == str(role.connector.metrics_port or role.port)
    assert tensor_parallel(["--tensor-parallel-size", "2", "-pp=2"]) == 4


def test_decode_connectors_listen_on_their_pod_ip_behind_headless_services(graph, tmp_path):
    objects = _objects(graph, tmp_path / "out")
    dep = load_config(graph)
    _, decode, _ = dep.load(check_router=False)
    services, workloads = _of(objects, "Service"), _of(objects, "Deployment")
    files = next(iter(_of(objects, "ConfigMap").values()))["data"]
    (tmp_path / "router.yaml").write_text(files["router.yaml"])
    router = load_config(tmp_path / "router.yaml")
    assert isinstance(router, RouterConfig)
    for role, inst in zip(decode, router.decode, strict=True):
        name = f"{dep.name}-{role.name}"
        c = workloads[name]["spec"]["template"]["spec"]["containers"][0]
        assert c["args"][2:] == ["--listen-host", "$(POD_IP)"]
        assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in c["env"]
        assert services[name]["spec"]["clusterIP"] == "None"
        assert inst.kv_address == f"{name}:{role.connector.listen_port}"
        assert {"name": "kv", "port": role.connector.listen_port, "targetPort": "kv"} in services[name]["spec"]["ports"]
    assert services[f"{dep.name}-router"]["spec"].get("clusterIP") != "None"
    # the router's /health is 503 while no decode is up: that must not restart it, only take it out of service
    rc = workloads[f"{dep.name}-router"]["spec"]["template"]["spec"]["containers"][0]
    assert rc["livenessProbe"]["tcpSocket"] == {"port": "http"} and rc["readinessProbe"]["httpGet"]["path"] == "/health"


def test_the_shared_secret_is_a_reference_and_refused_inline(tmp_path):
    objects = _objects(_two_by_two(tmp_path), tmp_path / "out")
    for w in _of(objects, "Deployment").values():
        env = {e["name"]: e for e in w["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["KVBRIDGE_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "pd-2x2-kvbridge", "key": "secret"}
    _role_file(tmp_path, "prefill.yaml", "prefill-0", 8100, secret="hunter2")
    with pytest.raises(ConfigError, match="prefill-0.yaml: connector: .*put it in the environment"):
        render(tmp_path / "deployment.yaml", "img")
    assert not any("hunter2" in f.read_text() for f in (tmp_path / "out").glob("*.yaml"))


def test_a_name_kubernetes_cannot_take_is_refused(tmp_path):
    graph = _two_by_two(tmp_path)
    graph.write_text(graph.read_text().replace("name: pd-2x2", "name: PD_2x2!"))
    with pytest.raises(ConfigError, match="not a Kubernetes DNS label"):
        render(graph, "img")


def _env(workload: dict) -> dict[str, dict]:
    return {e["name"]: e for e in workload["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_local_secret_files_and_variable_names_become_the_secrets_env_vars_in_the_pods(tmp_path):
    """A role or router file that reads its secrets from files (not in the pod) or from variables of other names
    still runs: the pod's copy reads the env vars the render fills from the Secret."""
    graph = _two_by_two(tmp_path)
    _role_file(tmp_path, "decode.yaml", "decode-0", 8200, listen_port=5600, secret_file="/run/secrets/kvb",
               secret_env="MY_DEPLOY_SECRET")
    router = yaml.safe_load((tmp_path / "router.yaml").read_text())
    router.update(kv_secret_file="/run/secrets/kvb", api_key_file="/run/secrets/api", backend_api_key_env="MY_VLLM_KEY")
    (tmp_path / "router.yaml").write_text(yaml.safe_dump(router))
    objects = _objects(graph, tmp_path / "out")
    files = next(iter(_of(objects, "ConfigMap").values()))["data"]
    decode, routed = yaml.safe_load(files["decode-0.yaml"]), yaml.safe_load(files["router.yaml"])
    assert decode["connector"]["secret_env"] == "KVBRIDGE_SECRET" and "secret_file" not in decode["connector"]
    assert (routed["kv_secret_env"], routed["api_key_env"], routed["backend_api_key_env"]) == (
        "KVBRIDGE_SECRET", "KVBRIDGE_ROUTER_API_KEY", "KVBRIDGE_VLLM_API_KEY")
    assert not {"kv_secret_file", "api_key_file", "backend_api_key_file"} & routed.keys()
    workloads = _of(objects, "Deployment")
    ref = lambda key: {"secretKeyRef": {"name": "pd-2x2-kvbridge", "key": key}}  # noqa: E731
    r = _env(workloads["pd-2x2-router"])
    assert (r["KVBRIDGE_SECRET"]["valueFrom"], r["KVBRIDGE_ROUTER_API_KEY"]["valueFrom"],
            r["KVBRIDGE_VLLM_API_KEY"]["valueFrom"]) == (ref("secret"), ref("api-key"), ref("backend-api-key"))
    for name in ("pd-2x2-prefill-0", "pd-2x2-decode-0", "pd-2x2-decode-1"):
        env = _env(workloads[name])  # vLLM asks for the key the router sends it
        assert env["KVBRIDGE_SECRET"]["valueFrom"] == ref("secret") and env["VLLM_API_KEY"]["valueFrom"] == ref(
            "backend-api-key")
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)


def test_without_api_keys_in_the_router_file_the_pods_ask_the_secret_for_none(tmp_path):
    workloads = _of(_objects(_two_by_two(tmp_path), tmp_path / "out"), "Deployment")
    assert not any({"VLLM_API_KEY", "KVBRIDGE_ROUTER_API_KEY"} & _env(w).keys() for w in workloads.values())

"""Secrets come from the environment or a file only: never in vLLM's command line, `config check`
output or what `kvbridge serve` prints; a routable decode listener without one does not start."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from launch.cli import main
from launch.role_config import RoleConfig, load_config
from pd.connector_config import ConnectorConfig, ConnectorConfigError
from router.config import RouterConfig
from transfer.config_errors import ConfigError

SECRET = "s3cret-value-that-must-not-leak"


def role(**connector) -> dict:
    return {"role": "decode", "name": "d0", "model": "m", "served_model_name": "m", "port": 8200,
            "connector": connector}


def test_a_secret_in_the_config_is_refused_without_repeating_it(tmp_path):
    with pytest.raises(ConnectorConfigError) as e:
        ConnectorConfig.from_extra({"secret": SECRET})
    assert SECRET not in str(e.value) and "KVBRIDGE_SECRET" in str(e.value)
    path = tmp_path / "decode.yaml"
    path.write_text(yaml.safe_dump(role(secret=SECRET)))
    out = subprocess.run([sys.executable, "-m", "launch.cli", "config", "check", str(path)], capture_output=True,
                         text=True)
    assert out.returncode == 1 and "secret" in out.stderr
    assert SECRET not in out.stdout + out.stderr


def test_vllm_command_names_the_secret_file_never_the_secret(tmp_path, monkeypatch):
    f = tmp_path / "secret"
    f.write_text(SECRET)
    cfg = RoleConfig.model_validate(role(secret_file=str(f), listen_host="0.0.0.0"))
    assert SECRET not in " ".join(cfg.vllm_command()) and str(f) in " ".join(cfg.vllm_command())
    assert cfg.listener_warning({}) == ""
    assert ConnectorConfig.from_extra({"secret_file": str(f)}).secret() == SECRET.encode()
    monkeypatch.setenv("KVBRIDGE_SECRET", SECRET)
    assert ConnectorConfig.from_extra({}).secret() == SECRET.encode()


def test_serve_refuses_a_routable_listener_without_a_secret(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KVBRIDGE_SECRET", raising=False)
    path = tmp_path / "decode.yaml"
    path.write_text(yaml.safe_dump(role(listen_host="0.0.0.0")))
    with pytest.raises(SystemExit) as e:
        main(["serve", str(path)])
    assert "would listen on 0.0.0.0 without a secret" in str(e.value) and "KVBRIDGE_SECRET" in str(e.value)
    insecure = load_config(_write(tmp_path, role(listen_host="0.0.0.0", insecure=True)))
    assert "INSECURE" in insecure.listener_warning({})
    assert load_config(_write(tmp_path, role())).listener_warning({}) == "", "loopback needs no secret"
    missing = load_config(_write(tmp_path, role(listen_host="0.0.0.0", secret_file=str(tmp_path / "nope"))))
    with pytest.raises(ConfigError, match="cannot read"):
        missing.listener_warning({})


def _write(tmp_path, data: dict):
    path = tmp_path / f"role-{abs(hash(str(data)))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_router_reads_its_kv_secret_from_a_file_and_refuses_an_unreadable_one(tmp_path):
    base = {"model": "m", "prefill": [{"name": "p", "url": "http://p"}],
            "decode": [{"name": "d", "url": "http://d", "kv_address": "d:1"}]}
    f = tmp_path / "kv"
    f.write_text(SECRET + "\n")
    cfg = RouterConfig.model_validate(dict(base, kv_secret_file=str(f)))
    assert cfg.push_key is not None and SECRET not in cfg.model_dump_json()
    with pytest.raises(ConfigError, match="cannot read"):
        RouterConfig.model_validate(dict(base, kv_secret_file=str(tmp_path / "nope"))).kv_cred


def test_up_refuses_a_store_admin_listener_without_a_secret_before_starting_anything(tmp_path, monkeypatch):
    """The prefill's store admin needs the secret as a decode listener does; `up` says so before any role runs
    (the connector would refuse only once vLLM had loaded it)."""
    import launch.supervisor
    monkeypatch.delenv("KVBRIDGE_SECRET", raising=False)
    monkeypatch.setattr(launch.supervisor.Supervisor, "start", lambda *_: pytest.fail("a role was started"))
    store = {"memory_bytes": "1MiB", "admin_port": 5700}
    prefill = dict(role(listen_host="0.0.0.0", store=store), role="prefill", name="p0")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(prefill))
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(dict(role(), port=8201)))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"role": "router", "model": "m", "prefill": [{"name": "p0", "url": "http://127.0.0.1:8200"}],
                                                     "decode": [{"name": "d0", "url": "http://127.0.0.1:8201",
                                                                 "kv_address": "127.0.0.1:5600"}]}))
    graph = tmp_path / "deployment.yaml"
    graph.write_text("role: deployment\nname: t\nprefill: [p.yaml]\ndecode: [d.yaml]\nrouter: r.yaml\n")
    with pytest.raises(SystemExit, match=r"p0's store admin \(port 5700 \+ TP rank\) would listen on 0.0.0.0 without a secret: "
                                         r"anyone who reaches it could read the store's statistics and clear it"):
        main(["up", str(graph), "--log-dir", str(tmp_path / "logs")])
    insecure = load_config(_write(tmp_path, dict(prefill, connector=dict(prefill["connector"], insecure=True))))
    assert "INSECURE: p0's store admin" in insecure.listener_warning({})
    assert insecure.listener_warning({"KVBRIDGE_SECRET": SECRET}) == ""

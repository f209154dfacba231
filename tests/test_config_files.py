"""Config files that would run differently from what they say are refused, naming the file and what is wrong."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from launch.role_config import load_config
from transfer.config_errors import ConfigError, load_yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DECODE = "role: decode\nname: d0\nmodel: m\nserved_model_name: m\nport: 8200\n"


def write(tmp_path, text: str | bytes, name: str = "decode.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    """YAML keeps the last: the first `connector:` block, with the listen address and secret file, would vanish."""
    path = write(tmp_path, DECODE + "connector:\n  listen_port: 5700\n  secret_file: /run/s\nconnector:\n"
                                    "  num_slots: 128\n")
    with pytest.raises(ConfigError, match=r"decode.yaml: .*key 'connector' appears twice \(first on line 6\)"):
        load_config(path)


def test_a_key_given_twice_inside_a_block_is_refused_too(tmp_path):
    with pytest.raises(ConfigError, match="key 'num_slots' appears twice"):
        load_config(write(tmp_path, DECODE + "connector: {num_slots: 64, num_slots: 128}\n"))


def test_a_file_that_is_not_utf8_is_refused_not_a_traceback(tmp_path):
    with pytest.raises(ConfigError, match="decode.yaml: not UTF-8"):
        load_config(write(tmp_path, DECODE.encode() + b"env:\n  X: \xff\xfe\n"))


@pytest.mark.parametrize("name", ["KVBRIDGE_SECRET", "HF_TOKEN", "OPENAI_API_KEY", "REDIS_PASSWORD"])
def test_a_secret_in_a_role_files_env_is_refused_without_repeating_it(tmp_path, name):
    """The file is plain text, and the Kubernetes render copies a role's env into a ConfigMap."""
    with pytest.raises(ConfigError, match=f"env: .*{name} looks like a secret") as e:
        load_config(write(tmp_path, DECODE + f"env:\n  {name}: hunter2-plaintext\n"))
    assert "hunter2" not in str(e.value)


def test_a_secret_in_a_deployments_env_is_refused(tmp_path):
    graph = "role: deployment\nname: t\nprefill: [p.yaml]\ndecode: [d.yaml]\nrouter: r.yaml\nenv:\n  MY_SECRET: x\n"
    with pytest.raises(ConfigError, match="MY_SECRET looks like a secret"):
        load_config(write(tmp_path, graph, "deployment.yaml"))


def test_ordinary_environment_settings_are_kept(tmp_path):
    env = {"HF_HOME": "/models", "TOKENIZERS_PARALLELISM": "false", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json"}
    role = load_config(write(tmp_path, DECODE + "env:\n" + "".join(f"  {k}: '{v}'\n" for k, v in env.items())))
    assert role.env == env


def test_yaml_merge_keys_still_work_and_may_be_overridden(tmp_path):
    """`<<: *anchor` brings keys in that the file may then set again: not a key given twice."""
    path = write(tmp_path, "base: &b {a: 1, b: 2}\nmerged:\n  <<: *b\n  b: 3\n", "anchors.yaml")
    assert load_yaml(path)["merged"] == {"a": 1, "b": 3}


def graph_copy(tmp_path):
    """The shipped local graph (configs/), copied so a test can change one file."""
    for f in ("deployment.yaml", "prefill.yaml", "decode.yaml", "router.yaml"):
        (tmp_path / f).write_text((CONFIGS / f).read_text())
    return tmp_path / "deployment.yaml"


def test_the_shipped_graph_describes_one_deployment(tmp_path):
    pre, dec, router = load_config(graph_copy(tmp_path)).load()
    assert [r.name for r in pre] == [i.name for i in router.prefill] and router.decode[0].kv_address == dec[0].kv_address


@pytest.mark.parametrize("file, old, new, said", [
    ("decode.yaml", "port: 8200", "port: 8201",
     "decode decode-0: the router sends to 127.0.0.1:8200, the role serves 127.0.0.1:8201"),
    ("decode.yaml", "listen_port: 5600", "listen_port: 5601",
     "decode decode-0: the router's kv_address is 127.0.0.1:5600, the role listens on 127.0.0.1:5601"),
    ("prefill.yaml", "name: prefill-0", "name: prefill-9", "prefill prefill-9: in the graph, not in the router file"),
], ids=["decode-port", "kv-port", "prefill-name"])
def test_a_router_file_that_does_not_send_to_the_graphs_roles_is_refused_naming_the_difference(
        tmp_path, file, old, new, said):
    """`kvbridge up` would otherwise wait out its health timeout for a router whose nodes are not where it looks."""
    path = graph_copy(tmp_path)
    text = (tmp_path / file).read_text()
    assert old in text
    (tmp_path / file).write_text(text.replace(old, new))
    with pytest.raises(ConfigError) as e:
        load_config(path).load()
    assert said in str(e.value), str(e.value)


@pytest.mark.parametrize("key, value, said", [
    ("router", "prefill.yaml", "router file prefill.yaml is a role file (role: prefill)"),
    ("decode", "[prefill.yaml]", "prefill.yaml is role prefill; this list takes role decode or both"),
    ("prefill", "[router.yaml]", "router.yaml is role router; this list takes role prefill or both"),
])
def test_a_file_in_the_wrong_place_of_the_graph_is_refused_naming_its_role(tmp_path, key, value, said):
    path = graph_copy(tmp_path)
    lines = [f"{key}: {value}" if ln.startswith(f"{key}:") else ln for ln in path.read_text().splitlines()]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_config(path).load()


def test_a_file_without_a_role_is_refused_saying_which_roles_there_are(tmp_path):
    """A router file without `role:` used to be judged as a vLLM role, its every router key "not permitted"."""
    router = (CONFIGS / "router.yaml").read_text().replace("role: router\n", "")
    with pytest.raises(ConfigError, match="router.yaml: role: missing; one of .*router, deployment"):
        load_config(write(tmp_path, router, "router.yaml"))


@pytest.mark.parametrize("router_host, role_host", [("localhost", "127.0.0.1"), ("127.0.0.1", "0.0.0.0")])
def test_a_router_reaching_a_role_by_another_name_for_its_listener_is_accepted(tmp_path, router_host, role_host):
    path = graph_copy(tmp_path)
    (tmp_path / "router.yaml").write_text((tmp_path / "router.yaml").read_text().replace(
        "http://127.0.0.1:8200", f"http://{router_host}:8200"))
    decode = (tmp_path / "decode.yaml").read_text()
    (tmp_path / "decode.yaml").write_text(decode.replace("host: 127.0.0.1", f"host: {role_host}", 1)
                                          if "host: 127.0.0.1" in decode else decode + f"host: {role_host}\n")
    load_config(path).load()

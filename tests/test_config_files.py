"""Config files that would run differently from what they say are refused, naming the file and what is wrong."""
from __future__ import annotations

import pytest

from launch.role_config import load_config
from transfer.config_errors import ConfigError

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
    role = load_config(write(tmp_path, DECODE + "env:\n  HF_HOME: /models\n  VLLM_CPU_KVCACHE_SPACE: '1'\n"))
    assert role.env == {"HF_HOME": "/models", "VLLM_CPU_KVCACHE_SPACE": "1"}

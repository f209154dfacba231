"""Real vLLM servers for end-to-end tests: started in fixtures, killed by process group."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".kvbridge" / "models" / "tiny"
LOG_DIR = ROOT / ".kvbridge" / "logs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="1",
               PYTHONPATH=str(ROOT))
    return env


class VllmServer:
    """One vLLM OpenAI server. `role` runs it with kvbridge's connector; `kv_config` with any other
    connector (the benches use NixlConnector); neither gives an aggregated server."""

    def __init__(self, name: str, role: str | None = None, extra: dict | None = None, policy: str = "recompute",
                 model: Path = MODEL_DIR, max_model_len: int = 2048, env: dict | None = None,
                 kv_config: dict | None = None, args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.extra = dict(extra or {})
        self.port = free_port()
        self.handshake_port = free_port() if role in ("kv_consumer", "kv_both") else None
        self._args = (role, extra, policy, model, max_model_len, env or {}, kv_config, args)
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """(Re)start on the same ports: a restart is a new incarnation at the same address."""
        role, extra, policy, model, max_model_len, env_over, kv, args = self._args
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager",
               "--dtype", "float32", "--max-model-len", str(max_model_len), "--max-num-seqs", "32", *args]
        if role:
            extra = dict(extra or {}, instance_id=self.name)
            if self.handshake_port:
                extra["listen_port"] = self.handshake_port
            kv = {"kv_connector": "KVBridgeConnector", "kv_connector_module_path": "pd.connector", "kv_role": role,
                  "kv_load_failure_policy": policy, "kv_connector_extra_config": extra}
        if kv:
            cmd += ["--kv-transfer-config", json.dumps(kv)]
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{self.name}.log"
        self._log = open(self.log_path, "ab" if self.proc else "wb")  # a restart appends to its own log
        # Decode computes on core 1, everything else on core 0: two nodes' worth of cores on one box.
        env = {**server_env(), "VLLM_CPU_OMP_THREADS_BIND": "1" if role == "kv_consumer" else "0", **env_over}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=ROOT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def handshake(self) -> str:
        return f"127.0.0.1:{self.handshake_port}"

    def wait_ready(self, timeout: float = 400) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.name} not healthy after {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


class RouterProcess:
    """The kvbridge router in front of the shared trio, as a real subprocess."""

    def __init__(self, prefill: VllmServer, decode: VllmServer, **overrides) -> None:
        import yaml
        self.port = free_port()
        cfg = {"role": "router", "host": "127.0.0.1", "port": self.port, "model": "tiny",
               "health_interval_s": 0.5, "unhealthy_after": 1,
               "prefill": [{"name": prefill.name, "url": prefill.url}],
               "decode": [{"name": decode.name, "url": decode.url, "kv_address": decode.handshake}], **overrides}
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.config_path = LOG_DIR / f"router-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self._log = open(LOG_DIR / f"router-{self.port}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "router.app", "--config", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=server_env(),
                                     start_new_session=True, cwd=ROOT)
        end = time.monotonic() + 30
        while True:
            try:
                requests.get(self.url + "/v1/models", timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > end or self.proc.poll() is not None:
                    raise RuntimeError("router did not start")
                time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

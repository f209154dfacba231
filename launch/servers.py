"""A vLLM role or the router as a process, built from its config: what `kvbridge up` supervises and what
the tests and benches start, so all three run the same command lines the same way."""
from __future__ import annotations

import sys
from pathlib import Path

from launch.process_handle import ProcessHandle
from launch.role_config import RoleConfig
from router.config import load_router_config


class VllmServer(ProcessHandle):
    """One vLLM OpenAI server from its RoleConfig; a restart keeps its ports (a new incarnation)."""

    def __init__(self, config: RoleConfig, log_dir: str | Path, env: dict[str, str] | None = None,
                 keep_old_log: bool = False, namespace: str | None = None) -> None:
        """`env` is the deployment's, under the role's own."""
        super().__init__(config.name, config.vllm_command(), config.url + "/health", {**(env or {}), **config.env},
                         log_dir, keep_old_log, namespace)
        self.config = config

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def handshake(self) -> str:
        """Where producers push KV to this server (decode and both roles)."""
        return self.config.kv_address


class RouterServer(ProcessHandle):
    """The kvbridge router from its YAML file, loaded here too for its address; healthy (its /health
    answers 200) once it has seen a healthy decode node."""

    def __init__(self, config_path: str | Path, log_dir: str | Path, name: str = "router",
                 env: dict[str, str] | None = None, keep_old_log: bool = False, namespace: str | None = None) -> None:
        self.config = load_router_config(config_path)
        super().__init__(name, [sys.executable, "-m", "router.app", "--config", str(config_path)],
                         f"{self.url}/health", env, log_dir, keep_old_log, namespace)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

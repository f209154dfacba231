"""Run a deployment graph locally: every prefill and decode role, then the router."""
from __future__ import annotations

import logging
import signal
import sys

from launch.role_config import DeploymentConfig, load_config
from launch.supervisor import Supervisor
from transfer.config_errors import ConfigError

log = logging.getLogger("kvbridge.deployment")


def run_deployment(path: str, demo: bool = False, log_dir: str = ".kvbridge/logs") -> None:
    dep = load_config(path)
    if not isinstance(dep, DeploymentConfig):
        raise ConfigError(f"{path}: expected role: deployment")
    prefill, decode, router = dep.load()
    with Supervisor(log_dir) as sup:
        for role in prefill + decode:
            sup.start(role.name, role.vllm_command(), f"http://{role.host}:{role.port}/health",
                      {**dep.env, **role.env})
        sup.wait_healthy()
        sup.start("router", [sys.executable, "-m", "router.app", "--config", str(dep.base_dir / dep.router)],
                  f"http://{router.host}:{router.port}/health", dep.env)
        sup.wait_healthy()
        url = f"http://{router.host}:{router.port}"
        log.info("deployment %s is up: OpenAI API at %s/v1", dep.name, url)
        if demo:
            from launch.demo import run_demo
            run_demo(url, router.model, [d.kv_address for d in decode],
                     [f"http://{p.host}:{p.port}" for p in prefill])
            return
        log.info("Ctrl-C stops everything")
        try:
            signal.pause()
        except KeyboardInterrupt:
            log.info("stopping")

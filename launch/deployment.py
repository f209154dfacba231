"""Run a deployment graph locally: every prefill and decode role, then the router, then the watchdog that
restarts a role that exits or hangs until Ctrl-C. A graph with `hosts:` runs each host in a network
namespace of its own (launch/placement.py), removed again when the deployment stops."""
from __future__ import annotations

import contextlib
import logging
import os
import time

from prometheus_client import start_http_server

from launch.netns import entered
from launch.placement import ROUTER, Placement
from launch.role_config import DeploymentConfig, load_config
from launch.servers import RouterServer, VllmServer
from launch.supervisor import Supervisor
from launch.watchdog import Watchdog
from transfer.config_errors import ConfigError

log = logging.getLogger("kvbridge.deployment")


def run_deployment(path: str, demo: bool = False, log_dir: str = ".kvbridge/logs") -> None:
    dep = load_config(path)
    if not isinstance(dep, DeploymentConfig):
        raise ConfigError(f"{path}: expected role: deployment")
    prefill, decode, router = dep.load()
    with contextlib.ExitStack() as stack:
        placed = stack.enter_context(Placement(dep, prefill, decode, router)) if dep.hosts else None
        sup = stack.enter_context(Supervisor())
        if placed:
            prefill, decode, router = placed.prefill, placed.decode, placed.router
            vllms = placed.vllm_servers(log_dir, dep.env, keep_old_log=True)
            stack.callback(placed.write_record(log_dir).unlink, missing_ok=True)  # where `status` finds the hosts
        else:
            vllms = [VllmServer(role, log_dir, env=dep.env, keep_old_log=True) for role in prefill + decode]
        for role in prefill + decode:  # a listener without its secret is refused now, before anything starts
            warning = role.listener_warning({**os.environ, **dep.env, **role.env})
            if warning:
                log.warning(warning)
        for server in vllms:
            sup.start(server)
        sup.wait_healthy()
        proxy = (placed.router_server(log_dir, dep.env, keep_old_log=True) if placed else
                 RouterServer(dep.base_dir / dep.router, log_dir, env=dep.env, keep_old_log=True))
        sup.start(proxy)
        sup.wait_healthy()
        url = proxy.url
        log.info("deployment %s is up: OpenAI API at %s/v1", dep.name, url)
        if placed:
            log.info("on host %s: `sudo ip netns exec %s curl %s/v1/models`, or `sudo kvbridge status %s`",
                     placed.host_of[ROUTER], placed.namespace(ROUTER), url, path)
        if demo:
            from launch.demo import run_demo
            with entered(placed.namespace(ROUTER) if placed else None):  # the router's host reaches every host
                run_demo(url, router.model, [d.kv_address for d in decode],
                         [p.url for p in prefill])
            return
        log.info("Ctrl-C stops everything; a role that exits or stops answering /health is restarted")
        watchdog = Watchdog(sup.processes)
        if dep.metrics_port:   # after the watchdog: its series exist, at 0, from the first scrape
            start_http_server(dep.metrics_port, addr="127.0.0.1")
            log.info("restart counts at http://127.0.0.1:%d/metrics", dep.metrics_port)
        try:
            while True:
                watchdog.tick()
                time.sleep(1)
        except KeyboardInterrupt:
            log.info("stopping (restarts: %s)", watchdog.restarts)

"""Three hosts on one box for the multi-host tests: prefill, decode and router each in a network
namespace of its own (launch/netns.py), started from a multi-host deployment graph through the same
Placement `kvbridge up` uses, with the deployment secret (the decode listens on a routable address).

The test process stays in its own namespace and reaches the hosts only by entering theirs for a call
(`on(host)`); zmq's I/O threads cannot follow it there, so consumer pool queries run as a short child
process inside the router's host.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from launch import netns
from launch.local_servers import LOG_DIR, MODEL_DIR, SERVED_MODEL
from launch.netns import entered
from launch.placement import RECORD, ROUTER, Placement
from launch.process_handle import ROOT
from launch.role_config import load_config
from launch.servers import RouterServer, VllmServer
from transfer import wire

PREFILL, DECODE = "prefill-h", "decode-h"
HOSTS = {"hp": [PREFILL], "hd": [DECODE], "hr": [ROUTER]}
LINK = {"rate": "10gbit"}
KV_PORT, METRICS_PORT, STORE_ADMIN_PORT = 5600, 9300, 5700
_VLLM_ARGS = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", "32"]
_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}


def write_graph(folder: Path, link: dict = LINK) -> Path:
    """The role files, router file and multi-host graph, as a user would write them for one box."""
    roles = {
        "prefill.yaml": {"role": "prefill", "name": PREFILL, "model": str(MODEL_DIR), "served_model_name": SERVED_MODEL,
                         "port": 8100, "vllm_args": _VLLM_ARGS, "env": dict(_ENV, VLLM_CPU_OMP_THREADS_BIND="0"),
                         "connector": {"checksum": True, "alloc_timeout_s": 3.0, "lease_ttl_s": 3.0,
                                       "metrics_port": METRICS_PORT,
                                       "store": {"memory_bytes": "64MiB", "admin_port": STORE_ADMIN_PORT}}},
        "decode.yaml": {"role": "decode", "name": DECODE, "model": str(MODEL_DIR), "served_model_name": SERVED_MODEL,
                        "port": 8200, "vllm_args": _VLLM_ARGS, "env": dict(_ENV, VLLM_CPU_OMP_THREADS_BIND="1"),
                        "connector": {"checksum": True, "listen_port": KV_PORT, "load_timeout_s": 4.0,
                                      "num_slots": 32, "quarantine_s": 0.5}},
        "router.yaml": {"role": "router", "port": 8000, "model": SERVED_MODEL, "health_interval_s": 0.5,
                        "health_timeout_s": 1.0, "unhealthy_after": 1, "connect_timeout_s": 2.0,
                        "prefill": [{"name": PREFILL, "url": "http://127.0.0.1:8100"}],
                        "decode": [{"name": DECODE, "url": "http://127.0.0.1:8200",
                                    "kv_address": f"127.0.0.1:{KV_PORT}"}]},
        "deployment.yaml": {"role": "deployment", "name": "three-hosts", "prefill": ["prefill.yaml"],
                            "decode": ["decode.yaml"], "router": "router.yaml", "hosts": HOSTS, "link": link},
    }
    for name, data in roles.items():
        (folder / name).write_text(yaml.safe_dump(data))
    return folder / "deployment.yaml"


@dataclass
class HostsDeployment:
    placed: Placement
    prefill: VllmServer
    decode: VllmServer
    router: RouterServer
    secret: str
    graph: Path

    def host(self, role: str) -> str:
        return self.placed.host_of[role]

    def on(self, role: str) -> contextlib.AbstractContextManager:
        """Calls made inside this block come from the host `role` runs on."""
        return entered(self.placed.namespace(role))

    def post(self, path: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
        """A client on the router's host."""
        with self.on(ROUTER):
            r = requests.post(self.router.url + path, json=body, timeout=timeout)
        return r.status_code, r.json()

    def router_health(self) -> int:
        """The router's /health status (503 once it has no healthy decode node), from its own host."""
        with self.on(ROUTER):
            try:
                return requests.get(self.router.url + "/health", timeout=5).status_code
            except requests.RequestException:
                return 0

    def reference(self, path: str, body: dict) -> tuple[int, dict]:
        """The prefill host computing the whole request itself (a request without kvbridge parameters
        is served as by aggregated vLLM): what PD must answer."""
        with self.on(PREFILL):
            r = requests.post(self.prefill.url + path, json=body, timeout=120)
        return r.status_code, r.json()

    def pool_status(self) -> wire.PoolStatus:
        """The decode connector's pool, asked as the router, from the router's host."""
        code = ("import sys; from transfer.control_request import fetch_pool_status as f; "
                "print(f(sys.argv[1], sys.argv[2].encode()).model_dump_json())")
        out = subprocess.run(self.placed.net.command(self.host(ROUTER), [sys.executable, "-c", code,
                                                                         self.decode.handshake, self.secret]),
                             capture_output=True, text=True, timeout=30, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if out.returncode != 0:
            raise AssertionError(f"pool status from {self.decode.handshake} failed: {out.stderr[-2000:]}")
        return wire.PoolStatus.model_validate(json.loads(out.stdout))

    def producer_metrics(self) -> dict[str, float]:
        with self.on(PREFILL):
            text = requests.get(f"http://{self.placed.address(PREFILL)}:{METRICS_PORT}/metrics", timeout=10).text
        return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                        if line.startswith("kvbridge_") and "_created" not in line)}


@pytest.fixture(scope="module")
def hosts(tiny_model, tmp_path_factory):
    """prefill, decode and router on three namespaces joined by 10 Gbit/s links; everything (processes,
    namespaces) gone after the module, whether its tests passed, failed or were interrupted. The
    prefill-decode link is emulated in this process (launch/tap_wire.py), so delay and loss can be set
    on it on any kernel (netem is often not built in)."""
    why = netns.unavailable()
    if why:  # root and iproute2 are what the test command needs here; without them the suite has not passed
        pytest.fail(f"multi-host tests cannot run on this machine: {why}")
    graph = write_graph(tmp_path_factory.mktemp("hosts"))
    dep = load_config(graph)
    secret = secrets.token_hex(16)
    env = {"KVBRIDGE_SECRET": secret}
    with Placement(dep, *dep.load(), wired=[("hp", "hd")]) as placed:
        vllms = placed.vllm_servers(LOG_DIR, env)
        started: list = []
        record = LOG_DIR / RECORD
        try:
            for s in vllms:
                s.start()
                started.append(s)
            for s in vllms:
                s.wait_ready()
            router = placed.router_server(LOG_DIR, env)
            router.start()
            started.append(router)
            router.wait_ready(60)
            placed.write_record(LOG_DIR)  # as `kvbridge up` does, for `kvbridge status`
            yield HostsDeployment(placed, vllms[0], vllms[1], router, secret, graph)
        finally:
            record.unlink(missing_ok=True)
            for s in started:
                s.terminate()
            for s in started:
                s.wait_stopped(20)

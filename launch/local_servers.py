"""Servers on this one machine, on free ports, as the tests and benches start them.

The same RoleConfig / RouterConfig and ProcessHandle as `kvbridge up`, with the settings of a small
box: the generated tiny model, fp32, eager mode, 1 GiB of KV cache, and the decode node computing on
core 1 while everything else computes on core 0 (two nodes' worth of cores on a 2-core machine).
"""
from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Literal, Sequence

import yaml

from launch.process_handle import ROOT
from launch.role_config import RoleConfig
from launch.servers import RouterServer, VllmServer
from router.config import RouterConfig

MODEL_DIR = ROOT / ".kvbridge" / "models" / "tiny"
LOG_DIR = ROOT / ".kvbridge" / "logs"
SERVED_MODEL = "tiny"


_PICK = random.SystemRandom()  # not the global generator, which a test may seed


def free_port(span: int = 1) -> int:
    """A port nothing listens on right now, for servers started side by side; with `span` > 1, the first of
    that many free ports in a row (a decode node with TP ranks listens on port + rank). Chosen below the
    kernel's ephemeral range: a server binds its port seconds after it was chosen, and a port from that range
    can meanwhile become the local end of some outgoing connection (a decode node once failed to start so)."""
    low = _ephemeral_low()
    top = low if low > 10000 + span else 65536  # a kernel whose ephemeral range starts low: any port then
    for _ in range(200):
        port = _PICK.randrange(10000, top - span)
        if all(_free(p) for p in range(port, port + span)):
            return port
    raise RuntimeError(f"no {span} free ports in a row on 127.0.0.1 below {low}")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _tp_size(vllm_args: Sequence[str]) -> int:
    args = list(vllm_args)
    for flag in ("--tensor-parallel-size", "-tp"):
        if flag in args[:-1]:
            return int(args[args.index(flag) + 1])
    return 1


def _cpu_env(role: str) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "1" if role == "decode" else "0"}


def start_vllm(name: str, role: Literal["prefill", "decode", "both", "aggregated"] = "aggregated",
               connector: dict | None = None, *, policy: Literal["recompute", "fail"] | None = None,
               model: Path = MODEL_DIR, max_model_len: int = 2048, env: dict[str, str] | None = None,
               vllm_args: Sequence[str] = ()) -> VllmServer:
    """Start (without waiting for) one vLLM server on a free port, its log in LOG_DIR/<name>.log; start
    several, then wait_ready() each, and they load in parallel. `connector` is kvbridge's connector
    settings (the decode and both roles also get a free handshake port; instance_id is `name`);
    role aggregated runs no kvbridge connector, and `vllm_args` may give it another one. `env` is the process's
    (secrets included), never written into the role file."""
    data: dict = {
        "role": role, "name": name, "model": str(model), "served_model_name": SERVED_MODEL, "port": free_port(),
        "vllm_args": ["--enforce-eager", "--dtype", "float32", "--max-model-len", str(max_model_len),
                      "--max-num-seqs", "32", *vllm_args],
        "env": {k: v for k, v in _cpu_env(role).items() if k not in (env or {})}}  # the caller's own settings win
    if role != "aggregated" or connector is not None:
        data["connector"] = dict(connector or {})
        if role in ("decode", "both"):
            data["connector"].setdefault("listen_port", free_port(span=_tp_size(vllm_args)))
    if policy is not None:
        data["load_failure_policy"] = policy
    server = VllmServer(RoleConfig.model_validate(data), LOG_DIR, env=env)  # `env` may hold secrets: not the file's
    server.start()
    return server


def start_router(config: RouterConfig, timeout: float = 30) -> RouterServer:
    """Write `config` where the router's log goes, start the router from it and wait until it is healthy."""
    path = LOG_DIR / f"router-{config.port}.yaml"
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True)))
    router = RouterServer(path, LOG_DIR, name=f"router-{config.port}")
    router.start()
    try:
        router.wait_ready(timeout)
    except BaseException:
        router.stop()
        raise
    return router

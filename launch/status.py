"""`kvbridge status`: one look at a running deployment, gathered from what each process already serves.

Nothing new is exposed for it: health is each server's /health, outstanding requests and the router's view
of every node come from the router's /metrics, staging, transfers and store tiers from a prefill engine's
`metrics_port`, restarts from `kvbridge up`'s own `metrics_port`, a decode connector's slots and transfers from the `stats` message on its handshake port,
and last errors from the logs `kvbridge up` writes. A part that does not answer is shown as such, never
waited on past `timeout_s`.
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from launch.netns import entered
from launch.placement import where_running
from launch.role_config import DeploymentConfig, RoleConfig, load_config
from router.config import RouterConfig
from transfer import wire
from transfer.config_errors import ConfigError
from transfer.control_auth import Credential
from transfer.control_request import ask

ROUTER_STATE = {0: "up", 1: "suspect", 2: "down"}
Samples = list[tuple[str, dict[str, str], float]]


@dataclass
class InstanceStatus:
    name: str
    kind: str
    url: str
    health: str = "?"
    router_view: str = ""
    outstanding: int | None = None
    slots: str = ""                  # free/total, decode
    staging: str = ""                # free/total, prefill
    transfers: dict[str, int] = field(default_factory=dict)   # final state -> count since the process started
    store: dict[str, dict[str, float]] = field(default_factory=dict)   # tier -> used_bytes, hits, misses
    errors: list[str] = field(default_factory=list)
    restarts: int | None = None      # by `kvbridge up`, from its metrics_port; None where not known
    given_up: bool = False


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as r:
        return r.status, await r.text()


async def _health(session: aiohttp.ClientSession, url: str) -> str:
    try:
        status, _ = await _get(session, url + "/health")
        return "ok" if status == 200 else f"HTTP {status}"
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return "unreachable" if isinstance(e, aiohttp.ClientConnectionError) else type(e).__name__


async def _samples(session: aiohttp.ClientSession, url: str) -> Samples | None:
    try:
        status, text = await _get(session, url)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    if status != 200:
        return None
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def _last_errors(log_dir: Path, name: str, n: int = 3) -> list[str]:
    """The role log's last ERROR lines and kvbridge's own warnings (a transfer FAILED or EXPIRED, a node
    going down), not vLLM's start-up warnings; only where `kvbridge up` ran on this machine."""
    path = log_dir / f"{name}.log"
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 256 * 1024))
        lines = f.read().decode(errors="replace").splitlines()
    return [ln.strip()[:200] for ln in lines
            if " ERROR " in ln or (" WARNING kvbridge." in ln and not ln.rstrip().endswith("is now UP"))][-n:]


def _apply_router(rows: dict[str, InstanceStatus], samples: Samples) -> None:
    for name, labels, value in samples:
        row = rows.get(labels.get("backend", ""))
        if row is None:
            continue
        if name == "kvbridge_router_outstanding":
            row.outstanding = int(value)
        elif name == "kvbridge_router_instance_state":
            row.router_view = ROUTER_STATE.get(int(value), str(value))


def _apply_supervisor(rows: dict[str, InstanceStatus], samples: Samples) -> None:
    for name, labels, value in samples:
        row = rows.get(labels.get("role", ""))
        if row is not None and name == "kvbridge_supervisor_restarts_total":
            row.restarts = int(value)
        elif row is not None and name == "kvbridge_supervisor_given_up":
            row.given_up = value == 1


def _apply_engine(row: InstanceStatus, samples: Samples) -> None:
    values = {(n, tuple(sorted(lab.items()))): v for n, lab, v in samples}
    free = values.get(("kvbridge_producer_staging_free_slots", ()))
    total = values.get(("kvbridge_producer_staging_slots", ()))
    if total:
        row.staging = f"{int(free or 0)}/{int(total)}"
    for name, labels, value in samples:
        if name == "kvbridge_transfer_transitions_total" and labels.get("state") in ("SENT", "FAILED", "ABORTED"):
            row.transfers[labels["state"]] = row.transfers.get(labels["state"], 0) + int(value)
        key = {"kvbridge_store_used_bytes": "used_bytes", "kvbridge_store_hits_total": "hits",
               "kvbridge_store_misses_total": "misses"}.get(name)
        if key and "tier" in labels:
            row.store.setdefault(labels["tier"], {})[key] = value


async def _decode_stats(row: InstanceStatus, role: RoleConfig, timeout_s: float, cred: Credential,
                        context: zmq.asyncio.Context) -> None:
    reply = await ask(role.kv_address, wire.Stats(rid=1), timeout_s, cred, context)
    if not isinstance(reply, wire.PoolStatus):
        row.slots = "no answer"
        return
    row.slots = f"{reply.free}/{reply.total}"
    # the receive book counts each final state as transfers_<state> (transfer/receive_book.py)
    row.transfers = {s: reply.counters[f"transfers_{s.lower()}"] for s in ("SCATTERED", "EXPIRED", "FAILED", "ABORTED")
                     if f"transfers_{s.lower()}" in reply.counters}


async def collect(path: str | Path, log_dir: str | Path = ".kvbridge/logs", timeout_s: float = 2.0) -> list[dict]:
    """Every instance of the deployment at `path`, router first, as plain dicts (what --json prints). A graph
    with `hosts:` is asked from its router's host, where `kvbridge up` placed it (needs root, as `up` did)."""
    dep = load_config(path)
    if not isinstance(dep, DeploymentConfig):
        raise ConfigError(f"{path}: expected role: deployment")
    prefill, decode, router, inside = where_running(dep, log_dir)
    rows = {"router": InstanceStatus("router", "router", _router_url(router))}
    for kind, roles in (("prefill", prefill), ("decode", decode)):
        rows.update({r.name: InstanceStatus(r.name, kind, r.url) for r in roles})
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    if dep.metrics_port:  # `kvbridge up`'s own, on this host
        async with aiohttp.ClientSession(timeout=timeout) as session:
            supervisor = await _samples(session, f"http://127.0.0.1:{dep.metrics_port}/metrics")
        if supervisor is not None:
            _apply_supervisor(rows, supervisor)
    with entered(inside):  # every socket below is made on the router's host: it reaches every host
        async with aiohttp.ClientSession(timeout=timeout) as session:
            healths = await asyncio.gather(*(_health(session, r.url) for r in rows.values()))
            for row, health in zip(rows.values(), healths):
                row.health = health
                row.errors = _last_errors(Path(log_dir), row.name)
            admin = f"http://{router.admin_host}:{router.admin_port}" if router.admin_port else rows["router"].url
            router_samples = await _samples(session, admin + "/metrics")
            if router_samples is not None:
                _apply_router(rows, router_samples)
            engines = [r for r in prefill + decode if r.connector.metrics_port]
            metrics = await asyncio.gather(*(_samples(
                session, f"http://{r.connector.listen_host}:{r.connector.metrics_port}/metrics") for r in engines))
            for role, samples in zip(engines, metrics):
                if samples is not None:
                    _apply_engine(rows[role.name], samples)
        context = zmq.asyncio.Context()  # made here: its I/O thread connects from the router's host (--watch:
        try:                              # from this collect's, should `up` have restarted on new namespaces)
            await asyncio.gather(*(_decode_stats(rows[r.name], r, timeout_s, router.kv_cred, context)
                                   for r in decode))
        finally:
            context.destroy(0)
    return [asdict(r) for r in rows.values()]


def _router_url(router: RouterConfig) -> str:
    host = "127.0.0.1" if router.host in ("0.0.0.0", "::") else router.host
    return f"http://{host}:{router.port}"

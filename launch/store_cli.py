"""`kvbridge store stats | clear | warmup FILE`: the prefix stores of a running deployment's prefill nodes.

stats and clear are admin messages to each prefill worker's store listener (`store.admin_port`, see
storage/admin_server.py), signed as `admin` with the deployment secret. warmup needs no new channel: it
sends each prompt to every prefill node's own OpenAI endpoint as a prefill-only request (max_tokens 1),
which computes the prompt and keeps its whole chunks in that node's store, and reports the chunks each
node's store holds before and after.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
from pathlib import Path

import requests
import zmq

from launch.placement import where_running
from launch.role_config import DeploymentConfig, RoleConfig, load_config
from storage.admin_messages import ADMIN_SENDER, AdminError, StoreAdminRequest, StoreReport, decode_report, encode
from transfer.config_errors import ConfigError
from transfer.control_auth import AuthError, Credential


class StoreAdminError(RuntimeError):
    """A node's store did not answer, refused the request, or is not reachable by `kvbridge store`."""


def ask_store(address: str, op: str, secret: bytes | None, timeout_s: float = 30.0) -> StoreReport:
    """One admin request to the store listener at host:port, signed as `admin`; its report."""
    cred = Credential(ADMIN_SENDER, secret)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://{address}")
        frame, nonce = cred.seal(encode(StoreAdminRequest(op=op)))
        sock.send(frame)
        if not sock.poll(int(timeout_s * 1000)):
            raise StoreAdminError(f"store admin at {address} did not answer {op} within {timeout_s:g} s")
        report = decode_report(cred.open_reply(sock.recv(), nonce))
    except (AuthError, AdminError) as e:
        raise StoreAdminError(f"store admin at {address}: {e}") from None
    finally:
        sock.close(0)
    if not report.ok:
        raise StoreAdminError(f"store admin at {address} refused {op}: {report.error} (is the deployment secret "
                              "the one the node runs with?)")
    return report


def store_nodes(path: str | Path, log_dir: str | Path = ".kvbridge/logs") -> tuple[list[RoleConfig], str | None]:
    """The deployment's nodes that keep a store (prefill and both roles with a `store:` section), where they
    run, and the namespace to reach them from (a graph with `hosts:`: its router's host; else None)."""
    dep = load_config(path)
    if not isinstance(dep, DeploymentConfig):
        raise ConfigError(f"{path}: expected role: deployment")
    prefill, _, _, inside = where_running(dep, log_dir)
    return [r for r in prefill if r.connector.store is not None], inside


def _admin_address(role: RoleConfig) -> str:
    port = role.connector.store.admin_port
    if not port:
        raise StoreAdminError(f"{role.name}: its store has no admin_port; set connector.store.admin_port and "
                              "restart the node to use `kvbridge store stats | clear`")
    return f"{role.connector.listen_host}:{port}"


def node_report(role: RoleConfig, op: str = "stats") -> StoreReport:
    """A clear first waits for queued background writes (up to 10 s), so it gets longer to answer."""
    return ask_store(_admin_address(role), op, role.connector.secret(), timeout_s=30.0 if op == "clear" else 10.0)


def read_prompts(path: str | Path) -> list[str | list[int]]:
    """One prompt per line; in a .jsonl file each line is {"prompt": text or token ids}."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    if str(path).endswith(".jsonl"):
        return [json.loads(ln)["prompt"] for ln in lines]
    return lines


def _prefill(role: RoleConfig, prompt: str | list[int], timeout_s: float) -> None:
    body = {"model": role.served_model_name, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    r = requests.post(role.url + "/v1/completions", json=body, timeout=timeout_s)
    if r.status_code != 200:
        raise StoreAdminError(f"{role.name}: warm-up prompt answered HTTP {r.status_code}: {r.text[:200]}")


def warmup(roles: list[RoleConfig], prompts: list[str | list[int]], parallel: int = 4,
           timeout_s: float = 600.0) -> dict[str, tuple[StoreReport, StoreReport]]:
    """Prefill every prompt on every node; per node, its store's report before and after."""
    before = {r.name: node_report(r) for r in roles}
    with cf.ThreadPoolExecutor(parallel) as pool:
        for f in [pool.submit(_prefill, r, p, timeout_s) for r in roles for p in prompts]:
            f.result()
    return {r.name: (before[r.name], node_report(r)) for r in roles}


def format_report(name: str, report: StoreReport, before: StoreReport | None = None) -> list[str]:
    out = []
    for tier, t in report.tiers.items():
        line = f"{name:<16} {tier:<7} {t.chunks:>7} chunks {t.used_bytes / 2**20:>10.1f} MiB"
        if t.capacity_bytes:
            line += f" of {t.capacity_bytes / 2**20:.0f} MiB"
        if before is not None and tier in before.tiers:
            line += f"  (+{t.chunks - before.tiers[tier].chunks} chunks stored by the warm-up)"
        if t.removed:
            line += f"  ({t.removed} removed)"
        out.append(line)
    return out


def store_lines(op: str, roles: list[RoleConfig], prompts_path: str | None = None, parallel: int = 4) -> list[str]:
    """What `kvbridge store OP` prints: each node's report (after a warm-up, with what it added)."""
    if op != "warmup":
        return [line for role in roles for line in format_report(role.name, node_report(role, op))]
    prompts = read_prompts(prompts_path)
    out = [line for name, (before, after) in warmup(roles, prompts, parallel).items()
           for line in format_report(name, after, before)]
    return out + [f"{len(prompts)} prompts prefilled on {len(roles)} node(s)"]

"""A multi-host graph on one box: each host of the graph's `hosts:` becomes a network namespace
(launch/netns.py) and every role runs in its host's, bound to that host's address.

The role and router files stay what they are for one box or a cluster; what placing changes is
rewritten here: a role's `host` and its connector's `listen_host` (KV, metrics, store admin) become its
host's address, and the router's instance URLs and `kv_address`es point at the hosts their roles were
placed on (same ports). KV moves over the veth links with UCX's TCP transport, on the host's own link devices.

`kvbridge up` writes where it placed each host (`RECORD` in its log directory), so that `kvbridge status`,
run later from another process, reaches the same hosts from the router's (`Placement.recorded`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit, urlunsplit

import yaml

from launch.netns import Host, LinkShape, Network, pid_alive
from launch.role_config import DeploymentConfig, HostLink, RoleConfig
from launch.servers import RouterServer, VllmServer
from router.config import RouterConfig

ROUTER = "router"
RECORD = "placement.json"


def where_running(dep: DeploymentConfig, log_dir: str | Path
                  ) -> tuple[list[RoleConfig], list[RoleConfig], RouterConfig, str | None]:
    """The graph's prefill and decode roles and router as a running `kvbridge up` placed them, and the
    namespace to reach them from (the router's host; None: this box's own, for a graph without `hosts:`)."""
    prefill, decode, router = dep.load(check_router=False)  # reads the roles, routes nothing
    if not dep.hosts:
        return prefill, decode, router, None
    placed = Placement.recorded(dep, prefill, decode, router, log_dir)
    return placed.prefill, placed.decode, placed.router, placed.namespace(ROUTER)


def link_shape(link: HostLink) -> LinkShape | None:
    if link.rate is None and link.delay is None and not link.loss:
        return None
    return LinkShape(link.rate, link.delay, link.loss)


def transport_env(net: Network, host: str) -> dict[str, str]:
    """NIXL's UCX over TCP on the host's own links (no shared memory across hosts), and vLLM told its
    address (it cannot find one by routing towards the internet from a namespace)."""
    return {"UCX_TLS": "tcp", "UCX_NET_DEVICES": ",".join(net.devices(host)),
            "VLLM_HOST_IP": net.hosts[host].address}


def _moved(url: str, address: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{address}:{parts.port}"))


class PlacementGone(RuntimeError):
    """No running deployment's placement where one was expected (status of a graph with `hosts:`)."""


class Placement:
    """The namespaces of a graph's hosts, and its roles rewritten to run on them."""

    def __init__(self, dep: DeploymentConfig, prefill: list[RoleConfig], decode: list[RoleConfig],
                 router: RouterConfig, shape: LinkShape | None = None,
                 wired: Sequence[tuple[str, str]] = (), net: Network | None = None) -> None:
        """`shape` overrides the graph's `link:`; `wired` host pairs get a link emulated in this process
        (Network's). Makes the namespaces (close() removes them), unless `net` is one that exists."""
        self.name = dep.name
        self.host_of = dep.host_of()
        self.net = net or Network(list(dep.hosts), shape or link_shape(dep.link), wired=wired)
        self.prefill = [self._placed(r) for r in prefill]
        self.decode = [self._placed(r) for r in decode]
        self.router = self._placed_router(router)

    def address(self, role: str) -> str:
        return self.net.hosts[self.host_of[role]].address

    def namespace(self, role: str) -> str:
        return self.net.hosts[self.host_of[role]].namespace

    def _placed(self, role: RoleConfig) -> RoleConfig:
        addr = self.address(role.name)
        data = role.model_dump(mode="json", exclude_unset=True)
        data.update(host=addr, env={**transport_env(self.net, self.host_of[role.name]), **role.env})
        data["connector"] = dict(data.get("connector", {}), listen_host=addr, listen_port=role.connector.listen_port)
        return RoleConfig.model_validate(data)

    def _placed_router(self, router: RouterConfig) -> RouterConfig:
        addr = self.address(ROUTER)
        data = router.model_dump(mode="json", exclude_unset=True)
        data.update(host=addr, admin_host=addr)
        data["prefill"] = [dict(i.model_dump(mode="json"), url=_moved(i.url, self.address(i.name)))
                           for i in router.prefill]
        data["decode"] = [dict(i.model_dump(mode="json"), url=_moved(i.url, self.address(i.name)),
                               kv_address=f"{self.address(i.name)}:{i.kv_address.rsplit(':', 1)[1]}")
                          for i in router.decode]
        return RouterConfig.model_validate(data)

    def vllm_servers(self, log_dir: str | Path, env: dict[str, str], keep_old_log: bool = False
                     ) -> list[VllmServer]:
        return [VllmServer(r, log_dir, env=env, keep_old_log=keep_old_log, namespace=self.namespace(r.name))
                for r in self.prefill + self.decode]

    def router_server(self, log_dir: str | Path, env: dict[str, str], keep_old_log: bool = False) -> RouterServer:
        """The router from its placed config, written next to its log (the file it runs from)."""
        path = Path(log_dir) / "router-placed.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.router.model_dump(mode="json", exclude_unset=True)))
        return RouterServer(path, log_dir, env=env, keep_old_log=keep_old_log, namespace=self.namespace(ROUTER))

    def write_record(self, log_dir: str | Path) -> Path:
        """Where each host is, for `recorded` in another process; valid while this process lives."""
        path = Path(log_dir) / RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        hosts = {h.name: {"namespace": h.namespace, "address": h.address} for h in self.net.hosts.values()}
        path.write_text(json.dumps({"deployment": self.name, "owner_pid": os.getpid(), "hosts": hosts}))
        return path

    @classmethod
    def recorded(cls, dep: DeploymentConfig, prefill: list[RoleConfig], decode: list[RoleConfig],
                 router: RouterConfig, log_dir: str | Path) -> Placement:
        """The placement a running `kvbridge up` of `dep` wrote to `log_dir`; PlacementGone if none runs."""
        path = Path(log_dir) / RECORD
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise PlacementGone(f"deployment {dep.name} runs on hosts, and {path} does not say where ({e}): "
                                "is `kvbridge up` running with this --log-dir?") from None
        hosts = {h: Host(h, v["namespace"], v["address"]) for h, v in record.get("hosts", {}).items()}
        missing = [h for h in hosts.values() if not Path("/run/netns", h.namespace).exists()]
        owner = record.get("owner_pid")
        owner_gone = not isinstance(owner, int) or not pid_alive(owner)
        if record.get("deployment") != dep.name or set(hosts) != set(dep.hosts) or missing or owner_gone:
            raise PlacementGone(f"{path} is not a running deployment {dep.name}'s placement (written by pid {owner}, "
                                f"{'gone' if owner_gone else 'running'}, for {record.get('deployment')!r}; "
                                f"namespaces gone: {[h.namespace for h in missing]})")
        return cls(dep, prefill, decode, router, net=Network.existing(hosts))

    def close(self) -> None:
        self.net.close()

    def __enter__(self) -> Placement:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Hosts on one box without vLLM: namespaces, links, cuts, the user-space wire, the multi-host graph."""
from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from launch import netns
from launch.k8s_render import render
from launch.netns import LinkShape, Network, entered
from launch.placement import Placement
from launch.role_config import load_config
from tests.hosts_fixtures import DECODE, PREFILL, write_graph
from transfer.config_errors import ConfigError

needs_netns = pytest.mark.skipif(netns.unavailable() is not None, reason=f"not run: {netns.unavailable()}")


class Sink:
    """A TCP server on host `dst` counting what arrives."""

    def __init__(self, net: Network, dst: str) -> None:
        self.address = net.hosts[dst].address
        with entered(net.hosts[dst].namespace):
            self.server = socket.create_server((self.address, 0))
        self.port, self.got = self.server.getsockname()[1], 0
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            while data := conn.recv(1 << 16):
                self.got += len(data)
        self.server.close()


def send(net: Network, src: str, sink: Sink, nbytes: int) -> None:
    with entered(net.hosts[src].namespace):
        client = socket.create_connection((sink.address, sink.port), timeout=60)
    with client:
        client.sendall(os.urandom(nbytes))
    sink.thread.join(60)


def _namespaces() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


@needs_netns
@pytest.mark.parametrize("wired", [False, True])
def test_bytes_sent_arrive_over_a_shaped_link_and_nothing_is_left(wired):
    before = _namespaces()
    with Network(["pa", "pb", "pc"], LinkShape(rate="1gbit"), wired=[("pa", "pb")] if wired else ()) as net:
        assert all(h.namespace in _namespaces() and h.address.startswith("198.18.") for h in net.hosts.values())
        sink = Sink(net, "pb")
        link_before = net.received("pa", "pb")
        send(net, "pa", sink, 8 << 20)
        assert sink.got == 8 << 20 and net.received("pa", "pb") - link_before >= 8 << 20
    assert _namespaces() == before


@needs_netns
def test_user_space_wire_with_loss_and_delay_still_delivers_every_byte():
    with Network(["pa", "pb"], wired=[("pa", "pb")]) as net:
        for a, b in (("pa", "pb"), ("pb", "pa")):
            net.shape(a, b, LinkShape(delay="5ms", loss=5.0))
        sink = Sink(net, "pb")
        send(net, "pa", sink, 1 << 20)
        assert sink.got == 1 << 20


@needs_netns
@pytest.mark.parametrize("wired", [False, True])
def test_a_cut_link_drops_silently_and_carries_again_once_restored(wired):
    with Network(["pa", "pb"], wired=[("pa", "pb")] if wired else ()) as net:
        sink = Sink(net, "pb")
        with entered(net.hosts["pa"].namespace):
            client = socket.create_connection((sink.address, sink.port), timeout=60)
        client.sendall(b"x" * 1000)
        net.set_link("pa", "pb", up=False)
        arrived = net.received("pa", "pb")
        client.sendall(b"y" * 1000)  # no error for the sender: the bytes wait in its send buffer
        assert net.received("pa", "pb") == arrived
        net.set_link("pa", "pb", up=True)
        client.close()
        sink.thread.join(60)
        assert sink.got == 2000


@needs_netns
def test_namespaces_of_a_dead_owner_are_removed():
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"kvb{dead.pid}-gone"
    subprocess.run(["ip", "netns", "add", name], check=True)
    assert name in netns.clean_stale() and name not in _namespaces()


def test_a_graph_must_place_every_role_exactly_once(tmp_path):
    path = write_graph(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["hosts"] = {"hp": [PREFILL], "hr": ["router"]}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="exactly once"):
        load_config(path).load()


@needs_netns
def test_placing_a_graph_points_every_address_at_its_host(tmp_path):
    dep = load_config(write_graph(tmp_path))
    with Placement(dep, *dep.load()) as placed:
        hp, hd = (placed.address(r) for r in (PREFILL, DECODE))
        (pre,), (dec,), router = placed.prefill, placed.decode, placed.router
        assert pre.host == hp and dec.host == hd and dec.connector.listen_host == hd
        assert pre.connector.listen_host == hp  # its metrics and store admin, reached from other hosts
        assert router.host == placed.address("router")
        assert router.prefill[0].url == f"http://{hp}:{pre.port}"
        assert router.decode[0].url == f"http://{hd}:{dec.port}" and router.decode[0].kv_address == dec.kv_address
        assert dec.env["UCX_TLS"] == "tcp" and dec.env["UCX_NET_DEVICES"] == ",".join(placed.net.devices("hd"))
        with pytest.raises(ConfigError, match=DECODE):  # a decode on its host's address needs the secret
            dec.listener_warning({})
        assert dec.listener_warning({"KVBRIDGE_SECRET": "s3cret"}) == ""


def test_the_kubernetes_renderer_reads_the_multi_host_graph_as_it_is(tmp_path):
    """Hosts are this box's stand-in for nodes: in a cluster each role is a pod, so the same graph renders
    the same manifests with or without `hosts:`."""
    path = write_graph(tmp_path)
    placed = render(path, "img")
    data = yaml.safe_load(path.read_text())
    del data["hosts"], data["link"]
    Path(path).write_text(yaml.safe_dump(data))
    assert render(path, "img") == placed

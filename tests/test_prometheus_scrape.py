"""A real Prometheus (Debian's `prometheus`, which launch/test.sh installs with promtool) scrapes a real
kvbridge router with configs/alerts.yaml loaded: a kvbridge series comes back from its query API and every
rule group is healthy, so the rules load in Prometheus itself, not only in promtool."""
from __future__ import annotations

import json
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest
import yaml

from launch.polling import wait_for
from launch.process_handle import ProcessHandle
from launch.servers import RouterServer

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.load(r)


@pytest.fixture
def router(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "router.yaml").read_text())
    cfg["port"] = _port()
    cfg["prefill"] = [{"name": "prefill-0", "url": f"http://127.0.0.1:{_port()}"}]   # nothing there: down
    cfg["decode"] = [{"name": "decode-0", "url": f"http://127.0.0.1:{_port()}", "kv_address": f"127.0.0.1:{_port()}"}]
    (tmp_path / "router.yaml").write_text(yaml.safe_dump(cfg))
    proc = RouterServer(tmp_path / "router.yaml", tmp_path / "logs")
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def prometheus(tmp_path, router):
    exe = shutil.which("prometheus")
    assert exe, "prometheus not found: install Debian's prometheus package (launch/test.sh does)"
    port = _port()
    shutil.copy(ROOT / "configs" / "alerts.yaml", tmp_path / "alerts.yaml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yaml"],
        "scrape_configs": [{"job_name": "kvbridge-router",  # a default scrape: honor_labels false
                            "static_configs": [{"targets": [f"127.0.0.1:{router.config.port}"]}]}]}))
    proc = ProcessHandle("prometheus", [exe, f"--config.file={tmp_path / 'prometheus.yml'}",
                                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                        f"--web.listen-address=127.0.0.1:{port}"],
                         f"http://127.0.0.1:{port}/-/ready", None, tmp_path / "logs")
    proc.start()
    proc.wait_ready(60)
    yield f"http://127.0.0.1:{port}"
    proc.stop()


def test_prometheus_reads_a_router_series_back_and_loads_the_rules(prometheus, router):
    def series() -> list[dict]:
        return _get(f"{prometheus}/api/v1/query?query=kvbridge_router_instance_state")["data"]["result"]
    wait_for(lambda: len(series()) == 2, 60, interval=0.5)
    # each node under its own name, beside the scraped target's `instance` (a node label named `instance` would
    # have been renamed exported_instance, and the dashboards' legends would show the router for every node)
    assert {(s["metric"]["kind"], s["metric"]["backend"], s["metric"]["instance"]) for s in series()} == {
        ("prefill", "prefill-0", f"127.0.0.1:{router.config.port}"),
        ("decode", "decode-0", f"127.0.0.1:{router.config.port}")}
    groups = _get(f"{prometheus}/api/v1/rules")["data"]["groups"]
    assert {g["name"] for g in groups} == {"kvbridge-recording", "kvbridge-alerts"}
    assert all(r["health"] in ("ok", "unknown") for g in groups for r in g["rules"]), groups
    wait_for(lambda: all(r["health"] == "ok" for g in _get(f"{prometheus}/api/v1/rules")["data"]["groups"]
                         for r in g["rules"]), 30, interval=0.5)

"""configs/alerts.yaml: valid for Prometheus (`promtool check rules`) and each alert fires on the series the
code exports, and stays quiet when things are fine (`promtool test rules`). promtool comes with Debian's
`prometheus` package, which launch/test.sh installs."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "configs" / "alerts.yaml"
UNIT_TESTS = ROOT / "tests" / "promtool" / "alerts_test.yaml"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool not found: install Debian's prometheus package (launch/test.sh does)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rules():
    r = _promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_fires_in_the_promtool_unit_tests():
    r = _promtool("test", "rules", str(UNIT_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    alerts = {x["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for x in g["rules"] if "alert" in x}
    firing = {t["alertname"] for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
              for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert alerts == firing, f"alerts never shown firing: {sorted(alerts - firing)}"


def test_a_wrong_expectation_fails(tmp_path):
    """The unit tests can fail: a threshold changed under them is caught."""
    (tmp_path / "rules.yaml").write_text(RULES.read_text().replace("kvbridge_router_decode_pool_free < 0.05",
                                                                   "kvbridge_router_decode_pool_free < 0.01"))
    tests = UNIT_TESTS.read_text().replace("../../configs/alerts.yaml", str(tmp_path / "rules.yaml"))
    (tmp_path / "t.yaml").write_text(tests)
    assert _promtool("test", "rules", str(tmp_path / "t.yaml")).returncode != 0

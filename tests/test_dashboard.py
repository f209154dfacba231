"""configs/grafana-dashboard.json and configs/alerts.yaml query only metrics the code exports: names are read
from the Counter/Gauge/Histogram definitions in the source (ast, nothing imported) plus prometheus_client's
process collector, and from every PromQL expression with a small tokenizer. The shipped dashboard is
launch/grafana_dashboard.py's output, so the two cannot drift."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY
from prometheus_client.process_collector import ProcessCollector

from launch.grafana_dashboard import render_json
from transfer.states import State, Transfer

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "configs" / "grafana-dashboard.json"
RULES = ROOT / "configs" / "alerts.yaml"
SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}


def exported_names() -> set[str]:
    names = set()
    for pkg in ("router", "pd", "transfer", "storage", "launch"):
        for path in (ROOT / pkg).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SUFFIXES
                        and node.args and isinstance(node.args[0], ast.Constant)):
                    base = node.args[0].value.removesuffix("_total") if node.func.id == "Counter" else node.args[0].value
                    names |= {base + s for s in SUFFIXES[node.func.id]}
    return names | {m.name for m in ProcessCollector(registry=None).collect()}


def metric_names(expr: str) -> set[str]:
    """Identifiers in selector position: strings, label matchers, ranges, grouping lists and function calls
    taken out first."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"[a-zA-Z_]\w*\s*\(", "(", expr)
    return {t for t in re.findall(r"[a-zA-Z_:][\w:]*", expr) if t not in KEYWORDS and not re.fullmatch(r"[eE]\d*", t)}


def _dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_the_shipped_dashboard_is_the_generated_one():
    assert DASHBOARD.read_text() == render_json(), "run: kvbridge render dashboard -o configs/grafana-dashboard.json"


def test_dashboard_and_alerts_query_only_exported_metrics():
    exported = exported_names()
    recorded = {r["record"] for r in _rules() if "record" in r}
    queried = {(where, n) for where, exprs in (("dashboard", _dashboard_exprs()), ("alerts", [r["expr"] for r in _rules()]))
               for e in exprs for n in metric_names(e)}
    unknown = sorted((w, n) for w, n in queried if n not in exported | recorded)
    assert not unknown, f"queried but never exported: {unknown}"
    assert len({n for _, n in queried}) >= 15   # the tokenizer found the names, not nothing


def test_the_name_check_catches_a_misspelled_metric():
    found = metric_names('sum by (tier) (rate(kvbridge_store_hit_total{tier=~"m.*"}[5m])) / on (tier) '
                         'histogram_quantile(0.99, kvbridge_router_ttft_bucket) > 1e3')
    assert found == {"kvbridge_store_hit_total", "kvbridge_router_ttft_bucket"}
    assert not found & exported_names()


def test_the_dashboard_covers_what_an_operator_asks_for():
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    assert {"Time to first token", "Inter-token latency", "Transfer time", "Push throughput", "Slot pool and staging",
            "Hits and misses per tier", "Transfers by final state", "Restarts"} <= titles


def test_a_finished_transfer_is_timed_by_its_final_state():
    def count() -> float:
        return REGISTRY.get_sample_value("kvbridge_transfer_seconds_count", {"role": "producer", "state": "SENT"}) or 0
    before = count()
    t = Transfer("t-dashboard", "producer")
    assert t.to(State.ALLOCATING) and t.to(State.SENDING)
    assert count() == before
    assert t.to(State.SENT) and count() == before + 1

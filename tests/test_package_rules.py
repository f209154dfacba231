"""The package plan, checked from source (ast, nothing executed): who may import whom, file sizes, names.

transfer/ moves KV and knows no vLLM; pd/ is the only package that imports vLLM (tests may, to build
the caches vLLM hands a connector); router/ reads the
consumer through transfer's wire module and never touches tensors or NIXL; launch/ starts things and
only bench/ and tests/ import it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("transfer", "pd", "router", "storage", "launch", "bench")
ALL_OURS = PACKAGES + ("tests",)

# package -> top-level names it must never import
FORBIDDEN = {
    "transfer": {"pd", "router", "launch", "bench", "tests", "vllm", "aiohttp", "requests"},
    "pd": {"router", "launch", "bench", "tests"},
    "router": {"pd", "launch", "storage", "bench", "tests", "vllm", "torch", "numpy", "nixl", "nixl_cu12",
               "nixl_cu13"},
    "storage": {"pd", "router", "launch", "bench", "tests", "vllm", "aiohttp"},
    "launch": {"tests"},
    "bench": {"tests"},
}
# Everything the router reaches inside transfer/ (directly or through those modules) may import only these.
ROUTER_REACH_ALLOWED = {"pydantic", "msgpack", "zmq", "yaml"}
HEAVY = {"torch", "numpy", "nixl", "nixl_cu12", "nixl_cu13", "vllm"}
GRAB_BAGS = {"utils", "util", "common", "helpers", "misc"}
MAX_LINES = 300


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ALL_OURS:
        for path in sorted((ROOT / pkg).glob("*.py")):
            out[f"{pkg}.{path.stem}"] = path
    return out


MODULES = _modules()


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in the file, also those inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            # `from transfer import wire` names a module: record it as transfer.wire
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                    if f"{node.module}.{a.name}" in MODULES]
    return out


def violations(rules: dict[str, set[str]]) -> list[str]:
    found = []
    for mod, path in MODULES.items():
        pkg = mod.split(".")[0]
        for line, imported in imports_of(path):
            top = imported.split(".")[0]
            if top in rules.get(pkg, ()):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {imported} ({pkg}/ must not import {top})")
            if top == "launch" and pkg not in ("launch", "bench", "tests"):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {imported} (only bench/ and tests/ "
                             "may import launch)")
            if top == "vllm" and pkg not in ("pd", "tests"):  # tests build what vLLM hands the connector
                found.append(f"{path.relative_to(ROOT)}:{line} imports {imported} (only pd/ imports vLLM)")
    return found


def router_reach_violations() -> list[str]:
    """Follow router/'s imports into transfer/ and report anything heavier than the wire needs."""
    found, seen = [], set()
    todo = [m for m in MODULES if m.startswith("router.")]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = MODULES[mod]
        for line, imported in imports_of(path):
            top = imported.split(".")[0]
            if imported in MODULES:
                todo.append(imported)
            elif mod.startswith("transfer.") and top not in ROUTER_REACH_ALLOWED and top in HEAVY | {"prometheus_client"}:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {imported}, and router/ reaches this module")
    return found


def test_no_package_imports_a_package_it_must_not():
    assert violations(FORBIDDEN) == []


def test_router_reaches_nothing_heavier_than_the_wire_module():
    assert router_reach_violations() == []


def test_the_checker_catches_a_forbidden_edge():
    """The rules above are live: with transfer/ forbidden from importing pydantic, the wire module is named."""
    found = violations({"transfer": {"pydantic"}})
    assert any(v.startswith("transfer/wire.py:") and "pydantic" in v for v in found), found


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_module_is_small_and_named_for_what_it_is(mod):
    path = MODULES[mod]
    assert path.stem not in GRAB_BAGS, f"{path.relative_to(ROOT)} is named for a grab-bag"
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (limit {MAX_LINES})"

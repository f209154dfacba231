"""How `kvbridge status` prints: a fixed-width table for people (one line per instance, then its last
errors), JSON for scripts, and --watch redrawing the table until Ctrl-C."""
from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import deque
from pathlib import Path

from launch.status import collect

COLUMNS = [("instance", 12), ("kind", 8), ("health", 12), ("router", 8), ("restarts", 12), ("out", 4), ("slots", 9),
           ("staging", 8), ("transfers", 30), ("store (tier used hit%)", 40)]


def _size(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return ""


def _store(tiers: dict[str, dict[str, float]]) -> str:
    parts = []
    for tier, v in sorted(tiers.items()):
        reads = v.get("hits", 0) + v.get("misses", 0)
        rate = f"{100 * v.get('hits', 0) / reads:.0f}%" if reads else "-"
        parts.append(f"{tier} {_size(v.get('used_bytes', 0))} {rate}")
    return ", ".join(parts)


WINDOW_S = 300   # --watch shows transfers over the last five minutes, not since each process started


def since(old: list[dict], new: list[dict]) -> list[dict]:
    """`new` with each instance's transfer counts less those in `old`; a restarted process (a count that
    went down) shows its counts since the restart."""
    before = {r["name"]: r["transfers"] for r in old}
    out = []
    for r in new:
        prev = before.get(r["name"], {})
        if any(v < prev.get(k, 0) for k, v in r["transfers"].items()):
            prev = {}
        out.append({**r, "transfers": {k: v - prev.get(k, 0) for k, v in r["transfers"].items()}})
    return out


def table(rows: list[dict]) -> str:
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS)).rstrip()
    out = [line([h for h, _ in COLUMNS])]
    for r in rows:
        transfers = " ".join(f"{k}={v}" for k, v in sorted(r["transfers"].items()))
        restarts = "" if r["restarts"] is None else f"{r['restarts']}{' given up' if r['given_up'] else ''}"
        out.append(line([r["name"], r["kind"], r["health"], r["router_view"], restarts,
                         "" if r["outstanding"] is None else str(r["outstanding"]), r["slots"], r["staging"],
                         transfers, _store(r["store"])]))
        out += [f"    ! {e}" for e in r["errors"]]
    return "\n".join(out)


def show(path: str | Path, log_dir: str | Path, as_json: bool, watch_s: float | None) -> int:
    """Exit status 0 when every instance answers /health, 1 otherwise (for scripts and readiness checks)."""
    history: deque[tuple[float, list[dict]]] = deque()
    while True:
        rows = asyncio.run(collect(path, log_dir))
        now = time.monotonic()
        history.append((now, rows))
        while now - history[0][0] > WINDOW_S:
            history.popleft()
        shown = since(history[0][1], rows) if watch_s and len(history) > 1 else rows
        text = json.dumps(shown, indent=2) if as_json else table(shown)
        if watch_s:
            span = f"transfers over the last {now - history[0][0]:.0f} s" if len(history) > 1 else "transfers since start"
            sys.stdout.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S ") + f"{path} ({span})\n")
        print(text, flush=True)
        if not watch_s:
            return 0 if all(r["health"] == "ok" for r in rows) else 1
        time.sleep(watch_s)

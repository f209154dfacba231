"""Run-time node changes that outlive the router process.

Nodes added through `/admin/nodes` and configured nodes drained away are written to `nodes_file` (when set),
so a restarted router serves the nodes it served before it stopped, not only its config file's. Only the
membership is kept: what each node holds is learned again from its replies (router/prefix_index.py), and health
from its checks. The file is JSON, rewritten whole through a temporary file and a rename, so a crash mid-write
leaves the previous version; an unreadable file stops the start with an error that names it.

    {"version": 1, "added": [{"kind": "decode", "name": ..., "url": ..., "kv_address": ...}], "removed": [names]}
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router.config import DecodeInstance, Instance
from transfer.config_errors import ConfigError

log = logging.getLogger("kvbridge.router")


class _Contents(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(default=1, ge=1, le=1)
    added: list[dict] = Field(default_factory=list)  # {"kind": ...} plus the instance spec
    removed: list[str] = Field(default_factory=list)  # names of configured nodes drained away


class NodeFile:
    """The run-time changes to the configured node list, kept in `path` (nothing is kept when it is None)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._c = _Contents()
        if path is not None and path.exists():
            try:
                self._c = _Contents.model_validate(json.loads(path.read_text()))
                for spec in self._c.added:
                    self.instance(spec)
            except (ValueError, ValidationError) as e:
                raise ConfigError(f"{path}: not a node file this router can read ({e}); move it away to start "
                                  "from the config file's nodes") from None

    @staticmethod
    def instance(spec: dict) -> Instance:
        """The instance a stored spec describes (validated as the admin endpoint validates it)."""
        fields = {k: v for k, v in spec.items() if k != "kind"}
        return (DecodeInstance if spec.get("kind") == "decode" else Instance).model_validate(fields)

    def apply(self, configured: dict[str, list[Instance]]) -> dict[str, list[Instance]]:
        """The nodes to serve: the configured ones less those drained away, plus those added at run time."""
        out = {kind: [i for i in insts if i.name not in self._c.removed] for kind, insts in configured.items()}
        names = {i.name for insts in out.values() for i in insts}
        for spec in self._c.added:
            if spec["name"] not in names:
                out[spec["kind"]].append(self.instance(spec))
        if self._c.added or self._c.removed:
            log.info("nodes from %s: %d added at run time, %d configured ones drained away (%s)", self.path,
                     len(self._c.added), len(self._c.removed), ", ".join(self._c.removed) or "none")
        return out

    def added(self, kind: str, inst: Instance) -> None:
        self._c.added = [s for s in self._c.added if s["name"] != inst.name] + [{"kind": kind, **inst.model_dump()}]
        self._c.removed = [n for n in self._c.removed if n != inst.name]
        self._write()

    def removed(self, name: str) -> None:
        before = len(self._c.added)
        self._c.added = [s for s in self._c.added if s["name"] != name]
        if len(self._c.added) == before and name not in self._c.removed:
            self._c.removed.append(name)  # a configured node: keep it away after a restart
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(self._c.model_dump_json(indent=1))
        os.replace(tmp, self.path)

"""Run-time node changes that outlive the router process.

Nodes added through `/admin/nodes` and configured nodes drained away are written to `nodes_file` (when set),
so a restarted router serves the nodes it served before it stopped, not only its config file's. Only the
membership is kept: what each node holds is learned again from its replies (router/prefix_index.py), and health
from its checks. A configured node drained away is listed in `removed`; added again at run time it stays there
and its new spec is in `added`, so a restart serves the spec it was last added with. The file is JSON, written
whole to a temporary file, flushed to disk and renamed over the old one, so a crash leaves the previous version
or the new one. One router writes a given file (two routers in front of the same nodes keep one file each); an
unreadable file stops the start with an error that names it.

    {"version": 1, "added": [{"kind": "decode", "name": ..., "url": ..., "kv_address": ...}], "removed": [names]}
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router.config import DecodeInstance, Instance
from transfer.config_errors import ConfigError, format_errors

log = logging.getLogger("kvbridge.router")


class AddedNode(BaseModel):
    """A node added at run time, as `POST /admin/nodes` takes it."""
    model_config = ConfigDict(extra="forbid")
    kind: Literal["prefill", "decode"]
    name: str
    url: str
    kv_address: str | None = None

    def instance(self) -> Instance:
        fields = self.model_dump(exclude={"kind"}, exclude_none=True)
        return (DecodeInstance if self.kind == "decode" else Instance).model_validate(fields)


class _Contents(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(default=1, ge=1, le=1)
    added: list[AddedNode] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)  # configured nodes not served


class NodeFile:
    """The run-time changes to the configured nodes, kept in `path` (nothing is kept when it is None)."""

    def __init__(self, path: Path | None, configured: set[str]) -> None:
        self.path, self._configured = path, configured
        self._c = _Contents()
        if path is not None and path.exists():
            try:
                self._c = _Contents.model_validate(json.loads(path.read_text()))
                for node in self._c.added:
                    node.instance()
            except ValidationError as e:  # its message only: str(e) would print a URL's credentials
                raise ConfigError(f"{path}: not a node file this router can read ({format_errors(e, path.name)}); "
                                  "move it away to start from the config file's nodes") from None
            except ValueError as e:
                raise ConfigError(f"{path}: not a node file this router can read ({e}); move it away to start "
                                  "from the config file's nodes") from None

    def apply(self, configured: dict[str, list[Instance]]) -> dict[str, list[Instance]]:
        """The nodes to serve: the configured ones not removed, plus those added at run time."""
        out = {kind: [i for i in insts if i.name not in self._c.removed] for kind, insts in configured.items()}
        for node in self._c.added:
            out[node.kind].append(node.instance())
        if self._c.added or self._c.removed:
            log.info("nodes from %s: added at run time %s; configured but not served %s", self.path,
                     [n.name for n in self._c.added] or "none", self._c.removed or "none")
        return out

    def added(self, node: AddedNode) -> None:
        """Record `node` as served (raises OSError when the file cannot be written: nothing changed then)."""
        c = self._c.model_copy(deep=True)
        c.added = [n for n in c.added if n.name != node.name] + [node]
        if node.name in self._configured and node.name not in c.removed:
            c.removed.append(node.name)  # the configured spec stays out: this one replaces it
        self._write(c)

    def removed(self, name: str) -> None:
        """Record `name` as no longer served (raises OSError when the file cannot be written)."""
        c = self._c.model_copy(deep=True)
        c.added = [n for n in c.added if n.name != name]
        if name in self._configured and name not in c.removed:
            c.removed.append(name)
        self._write(c)

    def _write(self, c: _Contents) -> None:
        if self.path is not None:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(c.model_dump_json(indent=1))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        self._c = c

"""`kvbridge nodes` and `kvbridge placement`: the router's admin endpoints (router/node_admin.py) from a shell.

    kvbridge nodes list --admin http://127.0.0.1:8001
    kvbridge nodes add decode decode-2 http://10.0.0.7:8200 --kv-address 10.0.0.7:5600 --admin ...
    kvbridge nodes drain decode-2 --admin ...      # returns once its in-flight requests are done
    kvbridge placement --mode auto --admin ...
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request


class AdminError(Exception):
    """The router refused or could not be reached; the message is its answer."""


def call(admin: str, method: str, path: str, body: dict | None = None, timeout_s: float = 600.0) -> dict:
    """One admin request; the router's API key (KVBRIDGE_ROUTER_API_KEY) is sent when set, for a router that
    serves /admin on its API port."""
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("KVBRIDGE_ROUTER_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(admin.rstrip("/") + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise AdminError(f"{method} {path}: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise AdminError(f"router admin at {admin} not reachable: {e}") from None


def nodes_command(admin: str, verb: str, kind: str | None = None, name: str | None = None, url: str | None = None,
                  kv_address: str | None = None, wait: bool = True) -> dict:
    if verb == "list":
        return call(admin, "GET", "/admin/nodes")
    if verb == "add":
        spec = {"kind": kind, "name": name, "url": url, **({"kv_address": kv_address} if kv_address else {})}
        return call(admin, "POST", "/admin/nodes", spec)
    if verb == "drain":
        return call(admin, "POST", f"/admin/nodes/{name}/drain" + ("" if wait else "?wait=0"))
    raise AdminError(f"unknown verb {verb!r}")


def placement_command(admin: str, mode: str | None) -> dict:
    return call(admin, "POST", "/admin/placement", {"mode": mode}) if mode else call(admin, "GET", "/admin/placement")

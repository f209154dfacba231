"""Test-side helpers that play the router: send both legs of a PD request at once."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import time
import uuid

import requests

from launch.polling import wait_for
from launch.servers import VllmServer
from transfer import wire
from transfer.control_request import ask
from transfer.control_request import fetch_pool_status as pool_status  # noqa: F401 (used by the test modules)

_pool = cf.ThreadPoolExecutor(16)


def post(url: str, path: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    r = requests.post(url + path, json=body, timeout=timeout)
    return r.status_code, r.json()


def pd_request(servers: dict, path: str, body: dict, push_to: str | None = None, prefill: bool = True,
               transfer_id: str | None = None, prefill_after_s: float = 0.0, named: bool = True
               ) -> tuple[tuple[int, dict] | None, tuple[int, dict]]:
    """Both legs concurrently, as the router does (the prefill leg `prefill_after_s` later), and like the
    router tells the decode connector when the prefill answered, naming the prefill node by its process as the
    router names a node by its time up (without `named`: a router that does not, so a node first named lately
    gets no handshake grace: transfer/answered_notices.py); returns (prefill reply, decode reply)."""
    tid = transfer_id or uuid.uuid4().hex
    pre_body = dict(body, max_tokens=1, stream=False,
                    kv_transfer_params={"kvbridge": {"transfer_id": tid,
                                                     "push_to": push_to or servers["decode"].handshake}})
    dec_body = dict(body, kv_transfer_params={"kvbridge": {"transfer_id": tid, "receive": True}})
    f_dec = _pool.submit(post, servers["decode"].url, path, dec_body)
    time.sleep(prefill_after_s)
    f_pre = _pool.submit(post, servers["prefill"].url, path, pre_body) if prefill else None
    pre = f_pre.result() if f_pre else None
    if pre is not None and pre[0] == 200:
        name = f"{servers['prefill'].name}#{servers['prefill'].proc.pid}" if named else ""
        notice = wire.PrefillAnswered(rid=1, transfer_id=tid, prefill=name)
        asyncio.run(ask(servers["decode"].handshake, notice, 5.0))
    return pre, f_dec.result()


def vllm_metric_sum(url: str, name: str) -> float:
    """A vLLM series summed over its labels, from the API server's /metrics."""
    text = requests.get(url + "/metrics", timeout=10).text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith(name + "{") or ln.startswith(name + " "))


def log_lines(server, *needles: str, last: int = 8) -> list[str]:
    """The last lines of a server's log that hold any of `needles`: what an assertion about the PD path
    prints, so a failure in a long suite says what the nodes saw (a node marked down, a transfer FAILED)."""
    try:
        lines = server.log_path.read_text(errors="replace").splitlines()
    except OSError as e:
        return [f"(log unreadable: {e})"]
    return [ln[:300] for ln in lines if any(n in ln for n in needles)][-last:]


def assert_kv_arrived(router_url: str, response: requests.Response, headers: dict | None = None) -> None:
    """The decode node scattered KV the prefill node pushed for this routed request; else the request's trace, as
    the router's /debug/requests shows it, is the failure's message: its connector parts say why."""
    rid = response.headers["x-kvbridge-request-id"]
    trace = requests.get(f"{router_url}/debug/requests/{rid}", headers=headers, timeout=5)
    assert trace.status_code == 200, trace.text
    trace = trace.json()
    assert (trace.get("decode_connector") or {}).get("state") == "SCATTERED", json.dumps(trace, indent=1)


def text_of(reply: dict) -> str:
    c = reply["choices"][0]
    return c["text"] if "text" in c else c["message"]["content"]


def source_tokens(url: str) -> dict[str, float]:
    """vLLM's own count of prompt tokens by where their KV came from."""
    out = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:prompt_tokens_by_source_total"):
            src = line.split('source="')[1].split('"')[0]
            out[src] = float(line.rsplit(" ", 1)[1])
    return out


def connector_metrics(server: VllmServer) -> dict[str, float]:
    """kvbridge's own metrics from a node's engine process (the connector's `metrics_port`)."""
    text = requests.get(f"http://127.0.0.1:{server.config.connector.metrics_port}/metrics", timeout=10).text
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                    if line.startswith("kvbridge_") and "_created" not in line)}


def wait_producer_idle(server: VllmServer, timeout: float = 15.0) -> float:
    """Seconds until the node's producer holds no transfer and every staging slot is free."""
    def idle() -> bool:
        m = connector_metrics(server)
        return (m.get("kvbridge_producer_active_transfers") == 0 and
                m.get("kvbridge_producer_staging_free_slots") == m.get("kvbridge_producer_staging_slots"))
    t0 = time.monotonic()
    try:
        wait_for(idle, timeout)
    except TimeoutError:
        raise AssertionError(f"producer still busy after {timeout}s: {connector_metrics(server)}") from None
    return time.monotonic() - t0

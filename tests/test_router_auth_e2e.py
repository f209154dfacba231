"""API keys through the router, against a prefill and a decode node started with vLLM's API key (issue 13).

The router's own key: a request without it, or with a wrong one, gets a 401 in OpenAI's error shape and
is never forwarded; with it, both legs go out carrying the backends' key (the prefill leg too: its KV
is what the decode node uses). A router without a backend key passes the client's `Authorization` on,
and a client's wrong key is the client's fault, never a backend's. `/health` and `/metrics` answer
without a key (they are for probes and scrapers; `admin_port` moves /metrics off the API address)."""
from __future__ import annotations

import pytest
import requests

from launch.local_servers import SERVED_MODEL, free_port, start_router, start_vllm
from launch.tiny_prompts import random_words
from router.config import RouterConfig
from tests import pd_client
from tests.conftest import DECODE_EXTRA, PREFILL_EXTRA

ROUTER_KEY, BACKEND_KEY = "router-key-4711", "vllm-key-0815"
BODY = {"model": "tiny", "prompt": random_words(300, seed=4711), "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def keyed_nodes(tiny_model):
    """A prefill and a decode node that answer /v1 only with BACKEND_KEY (vLLM reads VLLM_API_KEY)."""
    env = {"VLLM_API_KEY": BACKEND_KEY}
    nodes = [start_vllm("prefill-keyed", "prefill", PREFILL_EXTRA, env=env, vllm_args=("--no-enable-prefix-caching",)),
             start_vllm("decode-keyed", "decode", DECODE_EXTRA, env=env)]
    try:
        for n in nodes:
            n.wait_ready()
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def router_for(nodes, **keys) -> RouterConfig:
    prefill, decode = nodes
    return RouterConfig(port=free_port(), model=SERVED_MODEL, health_interval_s=0.5, unhealthy_after=1,
                        prefill=[{"name": prefill.name, "url": prefill.url}],
                        decode=[{"name": decode.name, "url": decode.url, "kv_address": decode.handshake}], **keys)


@pytest.fixture(scope="module")
def guarded(keyed_nodes, tmp_path_factory):
    """A router that wants ROUTER_KEY from clients and sends BACKEND_KEY to both legs (keys from files)."""
    keys = tmp_path_factory.mktemp("keys")
    (keys / "router").write_text(ROUTER_KEY + "\n")
    (keys / "backend").write_text(BACKEND_KEY + "\n")
    r = start_router(router_for(keyed_nodes, api_key_file=keys / "router", backend_api_key_file=keys / "backend"))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def expected(keyed_nodes) -> str:
    """The decode node's own answer to BODY, computed there whole (no KV comes with a plain request)."""
    decode = keyed_nodes[1]
    assert requests.post(decode.url + "/v1/completions", json=BODY, timeout=60).status_code == 401  # keyed for real
    r = requests.post(decode.url + "/v1/completions", json=BODY, timeout=60,
                      headers={"Authorization": f"Bearer {BACKEND_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def router_requests(url: str) -> dict[str, float]:
    """The router's kvbridge_router_requests_total by status, summed over endpoints: every request its
    proxy handled, forwarded or refused by a backend, is counted there."""
    out: dict[str, float] = {}
    for line in requests.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("kvbridge_router_requests_total{"):
            status = line.split('status="')[1].split('"')[0]
            out[status] = out.get(status, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def assert_kv_arrived(url: str, response: requests.Response) -> None:
    """The prefill leg was let in (refused, it would have pushed nothing and the decode node would have recomputed
    the prompt). The trace asks for the router's key."""
    pd_client.assert_kv_arrived(url, response, bearer(ROUTER_KEY))


def test_router_key_required_and_backend_key_sent_on_both_legs(guarded, expected):
    before = router_requests(guarded.url)
    for headers in ({}, bearer("wrong"), bearer(BACKEND_KEY), {"Authorization": ROUTER_KEY}):
        for stream in (False, True):
            r = requests.post(guarded.url + "/v1/completions", json=dict(BODY, stream=stream), headers=headers,
                              timeout=30)
            assert r.status_code == 401, (headers, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"], error
            assert "x-kvbridge-request-id" not in r.headers
    assert requests.get(guarded.url + "/v1/models", timeout=30).status_code == 401
    assert router_requests(guarded.url) == before  # refused at the door: the proxy never saw them

    r = requests.post(guarded.url + "/v1/completions", json=BODY, headers=bearer(ROUTER_KEY), timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected, r.text
    assert_kv_arrived(guarded.url, r)
    models = requests.get(guarded.url + "/v1/models", headers=bearer(ROUTER_KEY), timeout=30)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == SERVED_MODEL, models.text


def test_health_and_metrics_answer_without_a_key(guarded):
    health = requests.get(guarded.url + "/health", timeout=5)
    assert health.status_code == 200 and {i["state"] for k in health.json()["instances"].values() for i in k} == {"up"}
    metrics = requests.get(guarded.url + "/metrics", timeout=5)
    assert metrics.status_code == 200 and "kvbridge_router_requests_total" in metrics.text
    assert ROUTER_KEY not in metrics.text and BACKEND_KEY not in metrics.text
    assert ROUTER_KEY not in guarded.log_path.read_text() and BACKEND_KEY not in guarded.log_path.read_text()


def test_without_a_backend_key_the_clients_authorization_passes_through(keyed_nodes, expected):
    r = start_router(router_for(keyed_nodes))
    try:
        ok = requests.post(r.url + "/v1/completions", json=BODY, headers=bearer(BACKEND_KEY), timeout=60)
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == expected, ok.text
        assert_kv_arrived(r.url, ok)
        for headers in ({}, bearer("wrong")):
            refused = requests.post(r.url + "/v1/completions", json=BODY, headers=headers, timeout=60)
            assert refused.status_code == 401, refused.text
        # The backends refused a client's key: their fault it is not.
        health = requests.get(r.url + "/health", timeout=5).json()["instances"]
        assert {i["state"] for k in health.values() for i in k} == {"up"}, health
    finally:
        r.stop()

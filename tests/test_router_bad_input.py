"""Bad or unusual client input against the router (stub backends): a clear 4xx, never a 500 and never a node's
failure; and a prompt the prefill node refuses (a 4xx of its own) is the client's error, not the node's."""
from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import REGISTRY

from tests.router_stubs import REFUSAL, REQ, StubNode, eventually, post, states


def prefill_failures() -> float:
    return sum(REGISTRY.get_sample_value("kvbridge_router_prefill_failures_total", {"action": a}) or 0
               for a in ("decode_prefills", "error"))


async def raw_post(url: str, head: bytes, body: bytes) -> tuple[int, bytes]:
    """A request written byte by byte (an HTTP client would re-encode a header that is not UTF-8)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n" + head
                 + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    reply = await reader.read()
    writer.close()
    return int(reply.split(b" ", 2)[1]), reply.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize("dispatch", ["after_prefill", "with_prefill"])
async def test_with_on_prefill_failure_error_a_refused_prompt_gets_the_prefill_nodes_refusal(make, dispatch):
    """Not a 502 "prefill instance failed": the node is healthy, the request is what it refused."""
    pre, dec = StubNode("p", mode="refuse"), StubNode("d", kv=True)
    url, api = await make([pre], [dec], on_prefill_failure="error", decode_dispatch=dispatch)
    failures = prefill_failures()
    status, headers, raw = await post(url, REQ)
    assert (status, json.loads(raw)) == (400, REFUSAL) and "x-kvbridge-request-id" in headers
    assert prefill_failures() == failures and states(api, "prefill") == ["up"]
    tid = pre.bodies[0]["kv_transfer_params"]["kvbridge"]["transfer_id"]
    assert await eventually(lambda: tid in dec.cancels)  # nothing was pushed: the connector stops waiting


@pytest.mark.parametrize("status", [401, 404])
async def test_a_prefill_node_that_refuses_the_router_itself_is_a_prefill_failure(make, status):
    """A wrong backend key or path is the deployment's fault, not the request's: counted, and not passed off to
    the client as its own error."""
    pre, dec = StubNode("p", mode="refuse", refuse_status=status), StubNode("d", kv=True)
    url, _ = await make([pre], [dec], on_prefill_failure="error", decode_dispatch="after_prefill")
    failures = prefill_failures()
    status_seen, _, raw = await post(url, REQ)
    assert status_seen == 502 and json.loads(raw)["error"]["code"] == "prefill_failed"
    assert prefill_failures() == failures + 1


async def test_a_refused_prefill_leg_is_no_prefill_failure_and_the_decode_node_answers_alone(make):
    pre, dec = StubNode("p", mode="refuse"), StubNode("d", kv=True)
    url, api = await make([pre], [dec], decode_dispatch="after_prefill")
    failures = prefill_failures()
    status, _, raw = await post(url, REQ)
    assert status == 200 and json.loads(raw)["choices"][0]["text"] == "d"
    assert "kv_transfer_params" not in dec.bodies[0]  # it prefills the prompt itself (and would refuse it alike)
    assert prefill_failures() == failures and states(api, "prefill") == ["up"]


async def test_a_bearer_token_that_is_not_utf8_is_refused_with_401(make, monkeypatch):
    monkeypatch.setenv("ROUTER_TEST_KEY", "k1")
    url, _ = await make([StubNode("p")], [StubNode("d", kv=True)], api_key_env="ROUTER_TEST_KEY")
    status, _ = await raw_post(url, b"Authorization: Bearer \xff\xfe\r\n", json.dumps(REQ).encode())
    assert status == 401
    status, _ = await raw_post(url, b"Authorization: Bearer k1\r\n", json.dumps(REQ).encode())
    assert status == 200


async def test_a_body_nested_too_deeply_is_a_400_and_the_router_keeps_serving(make):
    url, api = await make([StubNode("p")], [StubNode("d", kv=True)])
    nested = b"[" * 200_000 + b"1" + b"]" * 200_000
    status, body = await raw_post(url, b"", b'{"model": "tiny", "max_tokens": 4, "prompt": ' + nested + b"}")
    assert status == 400 and b"nested too deeply" in body
    assert (await post(url, REQ))[0] == 200 and states(api) == ["up"]


async def test_stream_null_is_served_unstreamed_as_openai_does(make):
    url, _ = await make([StubNode("p")], [StubNode("d", kv=True)])
    status, _, raw = await post(url, dict(REQ, stream=None))
    assert status == 200 and json.loads(raw)["choices"][0]["text"] == "d"


async def test_a_request_the_decode_node_refuses_drops_the_kv_pushed_for_it(make):
    """vLLM checks some fields only where it serves the request (`n` above 1 with greedy sampling): the prefill
    leg, which drops them, computed and pushed the prompt. The decode node's 400 reaches the client, and the
    router tells its connector to drop that transfer now, not `unclaimed_ttl_s` later."""
    pre, dec = StubNode("p"), StubNode("d", mode="refuse", kv=True)
    url, api = await make([pre], [dec], decode_dispatch="after_prefill")
    status, _, raw = await post(url, REQ)
    assert (status, json.loads(raw)) == (400, REFUSAL) and states(api) == ["up"]
    tid = pre.bodies[0]["kv_transfer_params"]["kvbridge"]["transfer_id"]
    assert await eventually(lambda: tid in dec.cancels)

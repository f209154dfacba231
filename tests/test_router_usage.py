"""The cached tokens a PD answer reports are the prefill node's hit, not the decode node's (router/usage.py):
vLLM counts KV a connector loaded as cached, so a decode node that received the prompt reports all of it."""
from __future__ import annotations

import json

import pytest

from router.decode_relay import fix_answer
from tests.router_stubs import StubNode, events, post

PROMPT = "x" * 400  # 100 tokens to the stubs


def cached_of(answer: dict) -> int | None:
    return (answer.get("usage") or {}).get("prompt_tokens_details", {}).get("cached_tokens")


async def ask(url: str, body: dict) -> dict:
    """The answer's usage, from an unstreamed answer or a stream's usage chunk."""
    status, _, raw = await post(url, body)
    assert status == 200, raw
    if not body.get("stream"):
        return json.loads(raw)
    chunks = [json.loads(e) for e in events(raw) if e != "[DONE]"]
    assert all("kv_transfer_params" not in c for c in chunks)
    return next(c for c in chunks if c.get("usage"))


@pytest.mark.parametrize("stream", [False, True])
async def test_a_pd_answer_reports_the_prefill_nodes_cached_tokens_not_the_transferred_prompt(make, stream):
    url, _ = await make([StubNode("p", store=True)], [StubNode("d", kv=True, received=True)],
                        decode_dispatch="after_prefill")
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}
    first = await ask(url, body)
    assert cached_of(first) == 0, "a fresh prompt was computed by the prefill node: nothing was cached"
    assert "kv_transfer_params" not in first
    assert cached_of(await ask(url, dict(body, prompt=PROMPT[:200] + "y" * 200))) == 50, "the prefill node's hit"


async def test_without_the_prefill_nodes_count_the_decode_nodes_answer_passes_unchanged(make):
    """A prefill node started without --enable-prompt-tokens-details reports no count: nothing is invented."""
    url, _ = await make([StubNode("p", store=True, details=False)], [StubNode("d", kv=True, received=True)],
                        decode_dispatch="after_prefill")
    assert cached_of(await ask(url, {"model": "tiny", "prompt": PROMPT, "max_tokens": 4})) == 100


async def test_an_answer_served_without_a_prefill_leg_keeps_the_decode_nodes_count(make):
    """echo is served aggregated on the decode node (router/leg_bodies.py): its count is its own."""
    pre = StubNode("p", store=True)
    url, _ = await make([pre], [StubNode("d", kv=True, received=True)])
    assert cached_of(await ask(url, {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "echo": True})) == 100
    assert pre.bodies == []


def test_kv_transfer_params_leave_every_answer_null_or_not_and_other_bytes_pass_untouched():
    assert json.loads(fix_answer(b'{"id": "x", "kv_transfer_params": null}')) == {"id": "x"}
    assert json.loads(fix_answer(b'{"id": "x", "kv_transfer_params": {"kvbridge": {}}}')) == {"id": "x"}
    plain = b'{"id":  "x", "usage": {"prompt_tokens_details": {"cached_tokens": 3}}}'
    assert fix_answer(plain) is plain and fix_answer(plain, {"cached_tokens": 5}) is plain
    assert json.loads(fix_answer(plain, {"cached_tokens": 1}))["usage"]["prompt_tokens_details"]["cached_tokens"] == 1


def test_a_chat_answers_cache_writes_are_the_prefill_nodes_too():
    """The decode node wrote none of the prompt to its cache; the prefill node wrote what it computed."""
    chat = b'{"usage": {"prompt_tokens_details": {"cached_tokens": 100, "created_cache_tokens": 0}}}'
    fixed = json.loads(fix_answer(chat, {"cached_tokens": 20, "created_cache_tokens": 80}))
    assert fixed["usage"]["prompt_tokens_details"] == {"cached_tokens": 20, "created_cache_tokens": 80}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_decode_answer_that_ends_before_the_prefill_leg_answered_waits_for_its_count(make, stream):
    """Sent with the prefill leg, a short decode answer can be whole before the prefill node's answer was read:
    the router waits for it (at most router/usage.py's ANSWER_WAIT_S) rather than pass the decode's count."""
    url, _ = await make([StubNode("p", store=True, interval=0.3)], [StubNode("d", kv=True, received=True)],
                        decode_dispatch="with_prefill")
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}
    assert cached_of(await ask(url, body)) == 0

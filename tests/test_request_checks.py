"""The router's checks of a client's request (router/openai_errors.py), against what vLLM itself accepts."""
from __future__ import annotations

import json

import pytest

from router.openai_errors import APIError, parse_request


def parse(body: dict | bytes, endpoint: str = "completions") -> dict:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(raw, endpoint, "tiny", 32768)


@pytest.mark.parametrize("model", [None, "", "absent"])
def test_a_request_without_a_model_is_for_the_served_model_as_in_vllm(model):
    body = {"prompt": "hi"} if model == "absent" else {"model": model, "prompt": "hi"}
    assert parse(body)["model"] == "tiny"


def test_echo_with_max_tokens_0_scores_a_prompt_and_0_without_echo_is_refused():
    assert parse({"model": "tiny", "prompt": "a b", "echo": True, "max_tokens": 0, "logprobs": 1})["max_tokens"] == 0
    with pytest.raises(APIError) as e:
        parse({"model": "tiny", "prompt": "a b", "max_tokens": 0})
    assert e.value.status == 400 and e.value.param == "max_tokens" and "between 1 and" in e.value.message
    with pytest.raises(APIError):
        parse({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "echo": True, "max_tokens": 0},
              "chat")


def test_an_integer_too_long_to_read_is_a_400_not_a_500():
    """json.loads raises a plain ValueError past 4300 digits: it reached aiohttp as a 500."""
    with pytest.raises(APIError) as e:
        parse(b'{"model": "tiny", "prompt": "hi", "seed": ' + b"1" * 5000 + b"}")
    assert e.value.status == 400 and "not valid JSON" in e.value.message


def test_another_model_is_not_found_and_client_kv_transfer_params_are_dropped():
    with pytest.raises(APIError) as e:
        parse({"model": "gpt-17", "prompt": "hi"})
    assert e.value.status == 404 and e.value.code == "model_not_found"
    assert "kv_transfer_params" not in parse({"model": "tiny", "prompt": "hi", "kv_transfer_params": {"x": 1}})

"""The router's checks of a client's request (router/openai_errors.py), against what vLLM itself accepts."""
from __future__ import annotations

import json

import pytest

from router.openai_errors import APIError, parse_request


def parse(body: dict | bytes, endpoint: str = "completions") -> dict:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(raw, endpoint, "tiny", None)


@pytest.mark.parametrize("model", [None, "", "absent"])
def test_a_request_without_a_model_is_for_the_served_model_as_in_vllm(model):
    body = {"prompt": "hi"} if model == "absent" else {"model": model, "prompt": "hi"}
    assert parse(body)["model"] == "tiny"


def test_echo_with_max_tokens_0_scores_a_prompt_and_0_without_echo_is_refused():
    assert parse({"model": "tiny", "prompt": "a b", "echo": True, "max_tokens": 0, "logprobs": 1})["max_tokens"] == 0
    with pytest.raises(APIError) as e:
        parse({"model": "tiny", "prompt": "a b", "max_tokens": 0})
    assert e.value.status == 400 and e.value.param == "max_tokens" and "at least 1" in e.value.message
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


LENIENT = [("stream", "true"), ("stream", 1), ("stream", "no"), ("echo", "true"), ("echo", "false"),
           ("use_beam_search", "off"), ("n", "2"), ("n", 2.0), ("max_tokens", "16"), ("max_tokens", 16.0),
           ("max_completion_tokens", "9")]


@pytest.mark.parametrize("key,value", LENIENT)
def test_a_field_the_router_reads_is_read_as_vllms_own_request_model_reads_it(key, value):
    """Checked against vLLM's request models themselves: the router must not route a request by one reading of
    a field and have vLLM serve it by another."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    endpoint = "chat" if key == "max_completion_tokens" else "completions"
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]} if endpoint == "chat" else \
        {"model": "tiny", "prompt": "hi"}
    model = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
    assert parse({**base, key: value}, endpoint)[key] == getattr(model(**base, **{key: value}), key)


@pytest.mark.parametrize("key,value", [("stream", "sometimes"), ("echo", [1]), ("n", 2.5), ("max_tokens", "many"),
                                       ("max_tokens", -1), ("n", None), ("use_beam_search", None), ("n", 0)])
def test_a_value_vllm_would_refuse_is_a_400_naming_the_field_before_any_prefill(key, value):
    """vLLM checks these where it serves the request, the decode node: the prefill leg, which drops `n` and
    `use_beam_search`, would have computed and pushed the prompt for nothing."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    with pytest.raises(APIError) as e:
        parse({"model": "tiny", "prompt": "hi", key: value})
    assert e.value.status == 400 and e.value.param == key and str(value) in e.value.message
    with pytest.raises((ValueError, VLLMValidationError)):  # and vLLM refuses it too
        req = CompletionRequest(model="tiny", prompt="hi", **{key: value})
        SamplingParams(n=req.n, max_tokens=req.max_tokens)


def test_null_echo_on_chat_is_refused_as_vllm_refuses_it_and_n_over_the_claims_is_served_aggregated():
    from router.leg_bodies import needs_aggregated
    with pytest.raises(APIError) as e:
        parse({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "echo": None}, "chat")
    assert e.value.param == "echo"
    assert needs_aggregated(parse({"model": "tiny", "prompt": "hi", "n": "257"})) == "n_over_claims"
    assert needs_aggregated(parse({"model": "tiny", "prompt": "hi", "n": 256})) is None


def test_max_tokens_past_the_context_is_left_to_vllm_to_cap_unless_a_limit_is_set():
    assert parse({"model": "tiny", "prompt": "hi", "max_tokens": 10**9})["max_tokens"] == 10**9
    with pytest.raises(APIError) as e:
        parse_request(json.dumps({"prompt": "hi", "max_tokens": 40000}).encode(), "completions", "tiny", 32768)
    assert e.value.param == "max_tokens" and "between 1 and 32768" in e.value.message

"""Client request checks and OpenAI-format errors, so bad input never reaches a backend."""
from __future__ import annotations

import json

from aiohttp import web
from pydantic import TypeAdapter, ValidationError


TOO_DEEP = "request body is nested too deeply"
# The fields the router itself reads, with the types vLLM 0.32's request models give them on each endpoint. vLLM's
# pydantic models read leniently ("true", 1 and "yes" are true; "16" and 16.0 are 16), so the router reads them the
# same way and sends both legs the values vLLM would have read: a field the router and vLLM read differently could
# route a request one way and serve it another (an `n` of "2" was one claim on the transfer for two engine
# requests). A value vLLM refuses is refused here, before a prefill is spent on it.
_BOOL, _INT = TypeAdapter(bool), TypeAdapter(int)
_OPT_BOOL, _OPT_INT = TypeAdapter(bool | None), TypeAdapter(int | None)
_READ_AS = {
    "completions": {"stream": _OPT_BOOL, "echo": _OPT_BOOL, "use_beam_search": _BOOL, "n": _INT,
                    "max_tokens": _OPT_INT},
    "chat": {"stream": _OPT_BOOL, "echo": _BOOL, "use_beam_search": _BOOL, "n": _OPT_INT, "max_tokens": _OPT_INT,
             "max_completion_tokens": _OPT_INT}}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers())


def parse_request(raw: bytes, endpoint: str, model: str, max_tokens_limit: int | None) -> dict:
    """The validated body, with any client-supplied kv_transfer_params removed (never trusted). As in vLLM, a
    missing, null or empty `model` means the served model, and a `max_tokens` past what the model's context
    leaves is not an error (vLLM caps it); `max_tokens_limit`, when set, refuses more."""
    try:
        body = json.loads(raw)
    except ValueError as e:  # not UTF-8, not JSON, or an integer too long to convert
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, TOO_DEEP) from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    if body.get("model") in (None, ""):
        body["model"] = model
    if body["model"] != model:
        raise APIError(404, f"the model '{body['model']}' does not exist; this router serves '{model}'",
                       param="model", code="model_not_found")
    if endpoint == "completions":
        p = body.get("prompt")
        if p is None:
            raise APIError(400, "missing required field 'prompt'", param="prompt")
        if not isinstance(p, (str, list)) or (isinstance(p, list) and not p) or p == "":
            raise APIError(400, "'prompt' must be a non-empty string or list", param="prompt")
    else:
        msgs = body.get("messages")
        if msgs is None:
            raise APIError(400, "missing required field 'messages'", param="messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise APIError(400, "'messages' must be a non-empty list of objects with a 'role'", param="messages")
    _read_as_vllm_does(body, endpoint)
    if body.get("n") is not None and body["n"] < 1:
        raise APIError(400, f"'n' must be at least 1, got {body['n']}", param="n")
    for key in ("max_tokens", "max_completion_tokens"):
        if key not in _READ_AS[endpoint]:  # completions has no max_completion_tokens: vLLM ignores it there
            continue
        v, least = body.get(key), 0 if endpoint == "completions" and body.get("echo") is True else 1
        if v is not None and not least <= v <= (max_tokens_limit or v):
            bound = f"between {least} and {max_tokens_limit}" if max_tokens_limit else f"at least {least}"
            raise APIError(400, f"'{key}' must be an integer {bound} (0 only with echo, to score a prompt), got {v!r}",
                           param=key)
    body.pop("kv_transfer_params", None)
    return body


def _read_as_vllm_does(body: dict, endpoint: str) -> None:
    for key, adapter in _READ_AS[endpoint].items():
        if key in body:
            try:
                body[key] = adapter.validate_python(body[key])
            except ValidationError as e:
                kind = "a boolean" if adapter in (_BOOL, _OPT_BOOL) else "an integer"
                raise APIError(400, f"'{key}' must be {kind}, got {body[key]!r} ({e.errors()[0]['msg']})",
                               param=key) from None

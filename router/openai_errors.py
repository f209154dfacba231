"""Client request checks and OpenAI-format errors, so bad input never reaches a backend."""
from __future__ import annotations

import json

from aiohttp import web


TOO_DEEP = "request body is nested too deeply"


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


def parse_request(raw: bytes, endpoint: str, model: str, max_tokens_limit: int) -> dict:
    """The validated body, with any client-supplied kv_transfer_params removed (never trusted). As in vLLM, a
    missing, null or empty `model` means the served model."""
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
    for key in ("max_tokens", "max_completion_tokens"):
        v, least = body.get(key), 0 if endpoint == "completions" and body.get("echo") is True else 1
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not least <= v <= max_tokens_limit):
            raise APIError(400, f"'{key}' must be an integer between {least} and {max_tokens_limit} (0 only with "
                           f"echo, to score a prompt), got {v!r}", param=key)
    if body.get("stream") not in (None, True, False):  # null is OpenAI's (and vLLM's) "not streamed"
        raise APIError(400, "'stream' must be a boolean", param="stream")
    body.pop("kv_transfer_params", None)
    return body

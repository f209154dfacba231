"""What each leg of a PD request asks its vLLM for.

The prefill leg only has to compute the prompt's KV and push it: one token, not streamed, one
sequence, so parameters about the output are dropped from it (some would even make vLLM reject it:
`min_tokens` above 1, `stream_options` without `stream`). The decode leg is the client's request as
sent, plus the transfer it reads, and `claims`: how many engine requests (`n`) will read that
transfer, so the connector frees it only after the last one.

Some requests need the prompt's own forward pass on the node that answers, which transferred KV
skips: `echo` and `prompt_logprobs` (logprobs of prompt tokens come from that pass) and beam
search (vLLM expands it into requests the transfer does not name). So is an `n` above MAX_CLAIMS (more
engine requests than a transfer may have readers). They are served aggregated on the decode node: no
prefill leg, no kv params — correct, at the decode node's compute cost.
"""
from __future__ import annotations

from transfer.wire import MAX_CLAIMS
from transfer.push_token import sign

PREFILL_DROPS = frozenset({
    "n", "best_of", "min_tokens", "stream_options", "logprobs", "top_logprobs", "echo", "prompt_logprobs",
    "max_completion_tokens", "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "structured_outputs", "use_beam_search", "return_tokens_as_token_ids", "kv_transfer_params"})


def needs_aggregated(body: dict) -> str | None:
    """Why this request must be served without transferred KV, or None when PD can serve it."""
    if body.get("echo"):
        return "echo"
    if body.get("prompt_logprobs") is not None:
        return "prompt_logprobs"
    if body.get("use_beam_search"):
        return "beam_search"
    if (body.get("n") or 1) > MAX_CLAIMS:
        return "n_over_claims"
    return None


def prefill_body(body: dict, transfer_id: str, push_to: str, push_key: bytes | None = None,
                 token_ttl_s: float = 60.0) -> dict:
    """The prefill leg; with a deployment secret its push target is signed (transfer/push_token.py),
    and a client's own `kv_transfer_params` never reach the prefill node."""
    params = {"transfer_id": transfer_id, "push_to": push_to}
    if push_key is not None:
        params["push_token"] = sign(push_key, transfer_id, push_to, token_ttl_s)
    leg = {k: v for k, v in body.items() if k not in PREFILL_DROPS}
    leg.update(max_tokens=1, stream=False, kv_transfer_params={"kvbridge": params})
    return leg


def decode_body(body: dict, transfer_id: str) -> dict:
    n = body.get("n")
    claims = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
    return dict(body, kv_transfer_params={"kvbridge": {"transfer_id": transfer_id, "receive": True,
                                                       "claims": claims}})

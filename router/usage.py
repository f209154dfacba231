"""`usage.prompt_tokens_details.cached_tokens` on a PD answer: the prompt tokens whose KV was not computed for it.

vLLM counts as cached every prompt token it did not compute, those a KV connector loaded included. On a PD
request's decode node that is the whole prompt, so an answer through the router reported the prompt as
cached although the prefill node had just computed it: a client that bills or tunes by cached tokens reads a
cache hit that did not happen, and aggregated vLLM reports none. What the request skipped computing is the
prefill node's own hit (its prefix cache, its store), which its leg's answer reports. vLLM corrects this for
NixlConnector from the decode leg's parameters, but the router sends that leg before the prefill leg answers;
so it corrects the decode's answer instead: the smaller of the two counts, which is the prefill node's when the
KV came over and at most the decode node's own hit when it recomputed. Nodes report the count only when started
with --enable-prompt-tokens-details; without it nothing is written.
"""
from __future__ import annotations


def cached_tokens(usage: object) -> int | None:
    """`usage`'s prompt_tokens_details.cached_tokens, or None when the node did not report it."""
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and not isinstance(cached, bool) else None


def lower_cached_tokens(answer: dict, prefill_cached: int) -> bool:
    """Bring the answer's (or stream chunk's) reported cached tokens down to `prefill_cached`; whether it did."""
    usage = answer.get("usage")
    reported = cached_tokens(usage)
    if reported is None or reported <= prefill_cached:
        return False
    usage["prompt_tokens_details"]["cached_tokens"] = prefill_cached
    return True

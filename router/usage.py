"""`usage.prompt_tokens_details` on a PD answer: the prompt tokens whose KV was not computed for the request.

vLLM counts as cached every prompt token it did not compute, those a KV connector loaded included. On a PD
request's decode node that is the whole prompt, so an answer through the router reported the prompt as
cached although the prefill node had just computed it: a client that bills or tunes by cached tokens reads a
cache hit that did not happen, and aggregated vLLM reports none. What the request skipped computing is the
prefill node's own hit (its prefix cache, its store), which its leg's answer reports. vLLM corrects this for
NixlConnector from the decode leg's parameters, but the router sends that leg before the prefill leg answers;
so it corrects the decode's answer instead: the smaller of the two counts, which is the prefill node's when the
KV came over and at most the decode node's own hit when it recomputed; with it, the prefill node's count of
tokens it wrote to its cache (`created_cache_tokens`, chat answers), where the decode node wrote none. Nodes
report these only when started with --enable-prompt-tokens-details; without them nothing is written.
"""
from __future__ import annotations

import asyncio

ANSWER_WAIT_S = 1.0  # a decode answer is whole: the prefill leg that pushed its KV answered, or is about to


def details_of(usage: object) -> dict | None:
    """`usage`'s prompt_tokens_details when it holds an integer cached_tokens (what vLLM reports), else None."""
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return details if isinstance(cached, int) and not isinstance(cached, bool) else None


def cached_tokens(usage: object) -> int | None:
    details = details_of(usage)
    return None if details is None else details["cached_tokens"]


async def prefill_details(leg: asyncio.Task | None) -> dict | None:
    """The prefill leg's reported details once it answered, waiting for it at most ANSWER_WAIT_S (the decode
    node can finish a short answer before the router has read the prefill's); None without a count."""
    if leg is None:
        return None
    if not leg.done():
        await asyncio.wait({leg}, timeout=ANSWER_WAIT_S)  # never cancels the leg
    if not leg.done() or leg.cancelled() or leg.exception() is not None or not leg.result().ok:
        return None
    return details_of(leg.result().usage)


def correct_details(answer: dict, prefill: dict) -> bool:
    """Bring the answer's (or stream chunk's) counts to the prefill node's when it reports more cached tokens
    than the prefill node had; whether it changed anything."""
    details = details_of(answer.get("usage"))
    if details is None or details["cached_tokens"] <= prefill["cached_tokens"]:
        return False
    details["cached_tokens"] = prefill["cached_tokens"]
    if "created_cache_tokens" in details:
        details["created_cache_tokens"] = prefill.get("created_cache_tokens")
    return True

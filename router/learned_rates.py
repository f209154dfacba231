"""The rates the placement cost model runs on, each starting at its configured value and then following what
completed requests measured (an exponentially weighted mean, so one slow request on a loaded box moves it
a little, and a node that really got slower moves it within a few requests)."""
from __future__ import annotations

from dataclasses import dataclass

from router.metrics import LEARNED_RATE, child
from router.prefill_cost import PrefillCost


@dataclass
class Ewma:
    """A positive rate: `value` starts at the configured figure; `samples` counts what moved it."""
    name: str
    value: float
    weight: float = 0.2
    samples: int = 0

    def __post_init__(self) -> None:
        child(LEARNED_RATE, self.name).set(self.value)

    def observe(self, x: float) -> None:
        if x <= 0:
            return
        self.value += self.weight * (x - self.value)
        self.samples += 1
        child(LEARNED_RATE, self.name).set(self.value)


class LearnedRates:
    """chars per token (from prompt_tokens in replies), the prefill compute's cost (router/prefill_cost.py) and a
    prompt's fixed cost in seconds (from prefill legs that found their node idle: short prompts teach the fixed
    cost, longer ones the compute), shared-tier load tokens per second (from idle legs whose prefix only the shared
    tier held: what the leg took beyond computing the rest), and link bytes per second (from the decode
    connector's RECEIVING -> RECEIVED time of completed transfers, with the bytes the prompt's KV weighs)."""

    def __init__(self, chars_per_token: float, prefill_tokens_per_s: float, request_s: float,
                 shared_load_tokens_per_s: float, link_bytes_per_s: float) -> None:
        self.chars_per_token = Ewma("chars_per_token", chars_per_token)
        self.prefill = PrefillCost(prefill_tokens_per_s)
        self.request_s = Ewma("request_s", request_s)
        self.shared_load_tokens_per_s = Ewma("shared_load_tokens_per_s", shared_load_tokens_per_s)
        self.link_bytes_per_s = Ewma("link_bytes_per_s", link_bytes_per_s)

    def tokens(self, chars: int) -> float:
        return chars / self.chars_per_token.value

    def snapshot(self) -> dict:
        return {**{e.name: {"value": round(e.value, 3), "samples": e.samples}
                   for e in (self.chars_per_token, self.request_s, self.shared_load_tokens_per_s, self.link_bytes_per_s)},
                **self.prefill.snapshot()}

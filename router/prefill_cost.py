"""What a prefill node's compute of a prompt costs, learned from its legs: a cost per token that grows with the
token's position, since each token attends to all the tokens before it.

A token at position i costs `per_token_s + context_s * i`, so computing positions [held, tokens) takes
  (tokens - held) * (per_token_s + context_s * (tokens + held) / 2)
A single tokens-per-second rate fits whichever prompt length it last saw and is wrong for the others: on the
tiny model here a 2000-token prompt costs about 1.2x per token what a 1000-token one does, so a rate learned
from 1000-token prompts predicted a 2000-token prefill ~20 % short, and auto dispatch sent its decode leg that
much early.

Each idle leg gives one sample (mean position, seconds per computed token); the two coefficients are the
least-squares line through the samples, exponentially weighted so that a node that got slower is followed.
- A leg's weight grows with the square of the tokens it computed, up to `FULL_WEIGHT_TOKENS`: its time's noise
  (a scheduler hiccup, a first request of a new shape) is spread over that many tokens, and a 64-token leg that
  took half a second more than it should would otherwise read as a node fifteen times slower.
- Every sample makes the older ones fade by as much as it weighs, and one that took more than twice (or less
  than half) what the model expects counts as twice (half): a stalled leg moves the model a bounded step, and a
  node that got three times slower is followed within a dozen legs of 512 tokens or more (more of shorter ones).
- The configured start rate counts as one 128-token leg at the first leg's position: a first leg of 512 tokens
  or more all but replaces it, a short one that stalled moves it part of the way (short legs teach slowly, in
  both directions: a node that only ever sees short prompts is priced mostly by its fixed cost, `request_s`).
- While the samples are all of about one length the slope cannot be told from noise: the curve keeps its shape
  and moves to their level. The shape comes from the lengths seen: after a change of speed seen at one length
  only, predictions for other lengths are off until legs of those lengths come again.
"""
from __future__ import annotations

import math

from router.metrics import LEARNED_RATE, child

MIN_SPREAD = 0.15  # the positions' standard deviation, relative to their mean, below which the slope is kept
FULL_WEIGHT_TOKENS = 512  # a leg computing this many tokens or more weighs 1; fewer, (tokens / this) ** 2
CLIP = 2.0  # a leg's seconds per token is taken as at most this many times, and at least 1/this of, the expected
START_WEIGHT = (128 / FULL_WEIGHT_TOKENS) ** 2  # the configured start rate, as a sample


class PrefillCost:
    """Seconds to compute prompt positions, starting at a flat `start_tokens_per_s` and following the legs."""

    def __init__(self, start_tokens_per_s: float, weight: float = 0.2) -> None:
        self.per_token_s, self.context_s = 1.0 / start_tokens_per_s, 0.0
        self.weight, self.samples = weight, 0
        self._sums = [0.0] * 5  # weighted sums of 1, x, y, x*x, x*y
        self._export()

    def seconds(self, tokens: float, held: float = 0.0) -> float:
        """The compute of positions [held, tokens)."""
        if tokens <= held:
            return 0.0
        return (tokens - held) * (self.per_token_s + self.context_s * (tokens + held) / 2)

    def tokens_per_s(self) -> float:
        """The rate at the start of a prompt (where a token attends to nothing before it)."""
        return 1.0 / self.per_token_s

    def observe(self, tokens: float, held: float, seconds: float) -> None:
        """A leg computed positions [held, tokens) in `seconds` (its fixed cost already taken out)."""
        if not (tokens > held and 0 < seconds < math.inf):
            return
        x, y = (tokens + held) / 2, seconds / (tokens - held)
        expected = self.per_token_s + self.context_s * x
        if self.samples:
            y = min(max(y, expected / CLIP), expected * CLIP)
        else:  # the start value is a guess: the first leg is not clipped by it, only weighed against it
            self._sums = [START_WEIGHT * t for t in (1.0, x, expected, x * x, x * expected)]
        v = min(1.0, ((tokens - held) / FULL_WEIGHT_TOKENS) ** 2)
        fade = (1 - self.weight) ** v
        self._sums = [fade * s + v * t for s, t in zip(self._sums, (1.0, x, y, x * x, x * y))]
        self.samples += 1
        mx, my, mxx, mxy = (s / self._sums[0] for s in self._sums[1:])
        var = mxx - mx ** 2
        if var > (MIN_SPREAD * mx) ** 2:
            self.context_s = min(max(0.0, (mxy - mx * my) / var), my / mx)  # at most all of the cost
            self.per_token_s = max(my - self.context_s * mx, 1e-3 * my)
        else:  # one length: the same curve, scaled to the samples' level
            scale = my / (self.per_token_s + self.context_s * mx)
            self.per_token_s, self.context_s = self.per_token_s * scale, self.context_s * scale
        self._export()

    def snapshot(self) -> dict:
        return {"prefill_tokens_per_s": {"value": round(self.tokens_per_s(), 3), "samples": self.samples},
                "prefill_context_s": {"value": self.context_s, "samples": self.samples}}

    def _export(self) -> None:
        child(LEARNED_RATE, "prefill_tokens_per_s").set(self.tokens_per_s())
        child(LEARNED_RATE, "prefill_context_s").set(self.context_s)

"""How long auto dispatch holds an idle decode node's leg: until `decode_lead_s` before the prefill leg's
predicted end, brought forward by what the predictions lately missed by.

Why: a decode node that gets its leg well before the prefill ends admits the request while the prompt computes
and takes the KV the step it lands; one that gets it late, or after the answer, admits it only then. Predictions
on a loaded box miss by 15-20 % either way. With a fixed lead of 0.15 s, one run here (bench/pd_interleaved.py,
20 prompts of 1000 and 2000 tokens) sent 4 decode legs after their prefill answered (a 2000-token prompt
predicted at 2.26 s computed in 1.81 s), and the decode nodes waited 23-195 ms for their KV after the prefill's
last forward; with this rule, none, and 5-18 ms. Holding the leg still matters (vLLM's engine steps without
pause while a request waits for KV), so the lead grows only by what the predictions missed by.

The rule: over the last `window` prefill legs that answered, take actual / predicted; its `1 - cover` quantile q
is how much sooner than predicted the legs at the early edge answered. The leg waits `eta * min(q, 1) -
decode_lead_s` (at least 0; q is taken as at least 0.5, so the leg is held for at least half the prediction less
decode_lead_s). With cover 0.9, about 9 in 10 legs are sent before their prefill answers, if the next
predictions miss as the last ones did and by less than half. Until `min_samples` legs answered, and with
cover 0, the lead is `decode_lead_s` alone.
"""
from __future__ import annotations

import math
from collections import deque

from router.metrics import DECODE_LEAD_SCALE

MIN_SCALE = 0.5  # the leg waits at least this share of the predicted prefill


class DispatchLead:
    """The hold of an idle decode node's leg, learned from the prefill legs' actual / predicted times."""

    def __init__(self, lead_s: float, cover: float, window: int = 64, min_samples: int = 8) -> None:
        self.lead_s, self.cover, self.min_samples = lead_s, cover, min_samples
        self._ratios: deque[float] = deque(maxlen=window)
        self._scale = 1.0  # kept from the last observe: every request reads it, only answered legs change it
        DECODE_LEAD_SCALE.set(1.0)

    def observe(self, predicted_s: float, actual_s: float) -> None:
        """A prefill leg answered after `actual_s`; it had been predicted at `predicted_s`."""
        if predicted_s > 0 and actual_s > 0 and math.isfinite(predicted_s) and math.isfinite(actual_s):
            self._ratios.append(actual_s / predicted_s)
            if self.cover > 0 and len(self._ratios) >= self.min_samples:
                ordered = sorted(self._ratios)
                q = ordered[min(len(ordered) - 1, math.floor(round((1 - self.cover) * len(ordered), 9)))]  # 1-0.9<0.1
                self._scale = max(MIN_SCALE, min(1.0, q))
                DECODE_LEAD_SCALE.set(self._scale)

    def scale(self) -> float:
        """The share of a prediction the legs at the early edge took (1.0 while nothing is learned)."""
        return self._scale

    def wait_s(self, eta_s: float) -> float:
        """How long after the prefill leg went the decode leg is sent, for a leg predicted at `eta_s`."""
        return max(0.0, eta_s * self._scale - self.lead_s)

"""What the placement model decided for one request: the chosen decode node and prefill node (None: prefilled on
the decode node), the cost it estimated for each candidate, and why — kept for /debug/requests/{id}."""
from __future__ import annotations

from dataclasses import dataclass, field

from router.registry import Backend


@dataclass
class Candidate:
    decode: Backend
    prefill: Backend | None  # None: prefilled on the decode node
    cost_s: float
    parts: dict[str, float]  # the cost's terms, seconds (hits in tokens)

    def explain(self) -> dict:
        return {"decode": self.decode.name, "prefill": self.prefill.name if self.prefill else None,
                "where": "remote" if self.prefill else "local", "cost_s": round(self.cost_s, 6),
                **{k: round(v, 6) for k, v in self.parts.items()}}


@dataclass
class Decision:
    decode: Backend
    prefill: Backend | None
    reason: str
    why: str
    keys: list[str]
    chars: int
    tokens: float
    chosen: Candidate
    candidates: list[Candidate]
    predicted: dict[str, int] = field(default_factory=dict)  # node -> leading chunks it was believed to hold
    prefill_eta_s: float | None = None  # a prefill leg's predicted time, once it was sent (Placement.prefill_eta_s)

    @property
    def miss_tokens(self) -> float:
        """Prompt tokens the computing node is expected to compute (not held there)."""
        return self.tokens - self.chosen.parts["held_tokens"]

    @property
    def where(self) -> str:
        return "remote" if self.prefill else "local"

    def explain(self) -> dict:
        return {"decode": self.decode.name, "prefill": self.prefill.name if self.prefill else None,
                "where": self.where, "reason": self.reason, "why": self.why, "prompt_chars": self.chars,
                "prompt_tokens_estimated": round(self.tokens, 1), "prefix_chunks_held": self.predicted,
                "prefill_eta_s": None if self.prefill_eta_s is None else round(self.prefill_eta_s, 6),
                "candidates": [c.explain() for c in sorted(self.candidates, key=lambda c: c.cost_s)]}

"""Random prompts for the generated tiny model (launch/tiny_model.py), reproducible from a seed: token
ids inside its 1024-token vocabulary, and words made of the syllables its tokenizer was trained on.
Tests compare PD answers with aggregated ones on them; benches send them as load."""
from __future__ import annotations

import random

SYLLABLES = ["ka", "lo", "mi", "re", "tu", "sa", "ne", "vo", "pi", "da", "shi", "ran"]


def random_token_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 1000) for _ in range(n)]


def random_words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n))

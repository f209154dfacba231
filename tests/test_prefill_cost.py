"""The prefill compute's learned cost (router/prefill_cost.py): what it predicts for prompt lengths it saw, for
lengths between and beyond them, and with part of the prompt already held, when the node's true cost per
token grows with the token's position."""
from __future__ import annotations

import random

import pytest

from router.prefill_cost import PrefillCost

FLAT_S, CONTEXT_S = 0.42e-3, 2.2e-7  # about this box's tiny model: 1000 tokens 0.53 s, 2000 tokens 1.28 s


def true_s(tokens: float, held: float = 0.0, slower: float = 1.0) -> float:
    return slower * (tokens - held) * (FLAT_S + CONTEXT_S * (tokens + held) / 2)


def learned() -> PrefillCost:
    """A model that saw four legs of each of two lengths at the true cost."""
    cost = PrefillCost(2000.0)
    for n in [1000, 2000] * 4:
        cost.observe(n, 0, true_s(n))
    return cost


def test_legs_of_two_lengths_predict_every_length_and_a_held_prefix():
    cost = learned()
    for tokens, held in [(1000, 0), (2000, 0), (1500, 0), (4000, 0), (3000, 1000)]:
        assert cost.seconds(tokens, held) == pytest.approx(true_s(tokens, held), rel=0.01), (tokens, held)


def test_legs_of_one_length_fit_that_length_and_learn_no_slope():
    cost = PrefillCost(2000.0)
    for _ in range(5):
        cost.observe(1000, 0, true_s(1000))
    assert cost.context_s == 0.0
    assert cost.seconds(1000) == pytest.approx(true_s(1000), rel=0.01)  # the start rate all but faded


def test_a_long_first_leg_all_but_replaces_the_configured_start_rate():
    cost = PrefillCost(100000.0)
    cost.observe(1000, 0, 0.5)
    assert cost.tokens_per_s() == pytest.approx(2000.0, rel=0.05) and cost.samples == 1


def test_a_short_first_leg_that_stalled_moves_the_start_only_part_of_the_way():
    """An 80-token first leg half a second late reads as 15 times the cost per token; weighed against the
    configured start (as one 128-token leg) it makes the model less than 6 times too slow, not 15."""
    cost = PrefillCost(1 / FLAT_S)
    cost.observe(80, 0, true_s(80) + 0.5)
    assert true_s(100) < cost.seconds(100) < 6 * true_s(100)


@pytest.mark.parametrize("slower, within", [(1.5, 0.05), (3.0, 0.1)])
def test_a_node_that_got_slower_is_followed_within_a_dozen_legs(slower, within):
    cost = learned()
    for n in [1000, 2000] * 6:
        cost.observe(n, 0, true_s(n, slower=slower))
    assert cost.seconds(2000) == pytest.approx(true_s(2000, slower=slower), rel=within)


def test_a_short_leg_that_stalled_barely_moves_the_long_prompts_prediction():
    """A 64-token leg half a second late (a first request of a new shape, a scheduler hiccup) reads as 15 times
    the cost per token; it moves a 2000-token prediction by under 2 %, a 128-token one by under 5 %."""
    cost = learned()
    cost.observe(64, 0, true_s(64) + 0.5)
    assert cost.seconds(2000) == pytest.approx(true_s(2000), rel=0.02)
    assert cost.seconds(128) == pytest.approx(true_s(128), rel=0.05)


def test_a_long_leg_that_stalled_moves_the_model_a_bounded_step():
    cost = learned()
    cost.observe(2000, 0, true_s(2000) * 10)
    assert true_s(2000) < cost.seconds(2000) < 1.5 * true_s(2000)


def test_a_change_of_speed_seen_at_one_length_is_right_everywhere_once_other_lengths_come_again():
    cost = learned()
    for _ in range(12):
        cost.observe(2000, 0, true_s(2000, slower=2.0))
    assert cost.seconds(2000) == pytest.approx(true_s(2000, slower=2.0), rel=0.05)
    for n in [1000, 2000] * 3:
        cost.observe(n, 0, true_s(n, slower=2.0))
    for n in (500, 1000, 4000):
        assert cost.seconds(n) == pytest.approx(true_s(n, slower=2.0), rel=0.03), n


def test_noisy_legs_never_give_a_negative_cost_or_slope():
    rng = random.Random(7)
    cost = PrefillCost(2000.0)
    for _ in range(200):
        n = rng.choice([200, 1000, 2000, 3500])
        cost.observe(n, 0, true_s(n) * rng.uniform(0.7, 1.3))
        assert cost.context_s >= 0 and cost.per_token_s > 0
    assert cost.seconds(2000) == pytest.approx(true_s(2000), rel=0.25)


def test_legs_whose_cost_is_all_context_keep_a_positive_flat_part():
    cost = PrefillCost(2000.0)
    for n in [1000, 2000] * 4:
        cost.observe(n, 0, n * CONTEXT_S * n / 2)
    assert cost.per_token_s > 0 and cost.seconds(3000) == pytest.approx(3000 * CONTEXT_S * 1500, rel=0.02)


def test_nothing_to_compute_costs_nothing_and_teaches_nothing():
    cost = PrefillCost(2000.0)
    cost.observe(1000, 1000, 0.1)
    cost.observe(1000, 0, 0.0)
    cost.observe(1000, 0, float("nan"))
    cost.observe(1000, 0, float("inf"))
    assert cost.samples == 0 and cost.seconds(1000, 1000) == 0.0 and cost.seconds(500, 800) == 0.0


def test_the_break_even_prompt_costs_the_decode_node_as_much_as_going_remote():
    """The placement model's break-even length, with a cost that grows with the context, is where an idle
    decode node's extra compute (its local_penalty) equals a prefill node's overhead plus the KV's move."""
    from router.placement import Placement
    from router.placement_config import PlacementConfig

    cfg = PlacementConfig()
    placement = Placement(cfg, None, prefix_aware=False)
    placement.rates.prefill = learned()
    n = placement.break_even_tokens()
    local = (cfg.local_penalty - 1) * placement.rates.prefill.seconds(n)
    remote = cfg.remote_overhead_s + n * cfg.kv_bytes_per_token / placement.rates.link_bytes_per_s.value
    assert 0 < n < 1e6 and local == pytest.approx(remote, rel=1e-6)

"""DispatchLead (router/dispatch_lead.py): how long auto dispatch holds an idle decode node's leg, learned from
the prefill legs' actual / predicted times. Invariants: with nothing learned, or cover 0, the leg waits the
prediction less decode_lead_s; it never waits longer than that, never less than half the prediction less
decode_lead_s, and never a negative time; only the last `window` legs count."""
from __future__ import annotations

import math

import pytest
from prometheus_client import REGISTRY

from router.dispatch_lead import DispatchLead


def taught(ratios: list[float], cover: float = 0.9, **kw) -> DispatchLead:
    lead = DispatchLead(lead_s=0.15, cover=cover, **kw)
    for r in ratios:
        lead.observe(2.0, 2.0 * r)
    return lead


def test_until_enough_legs_answered_the_leg_waits_the_prediction_less_decode_lead_s():
    lead = taught([0.7] * 7)
    assert lead.scale() == 1.0 and lead.wait_s(2.0) == pytest.approx(1.85)


def test_legs_that_answered_sooner_bring_the_leg_forward_by_the_early_edges_shortfall():
    lead = taught([1.0] * 16 + [0.8] * 4)  # a fifth of them 20 % short: the 10 % quantile is 0.8
    assert lead.scale() == pytest.approx(0.8) and lead.wait_s(2.0) == pytest.approx(2.0 * 0.8 - 0.15)
    assert REGISTRY.get_sample_value("kvbridge_router_decode_lead_scale") == pytest.approx(0.8)


@pytest.mark.parametrize("ratios, scale", [([0.7, 0.8, 0.9] + [1.0] * 17, 0.9), ([0.6, 0.7] + [1.0] * 8, 0.7)])
def test_the_scale_is_the_ratio_that_leaves_one_leg_in_ten_below_it(ratios, scale):
    assert taught(ratios).scale() == pytest.approx(scale)


def test_a_few_early_legs_below_the_cover_leave_the_lead_alone():
    lead = taught([1.0] * 19 + [0.6])  # one in 20: within the 10 % the lead need not cover
    assert lead.scale() == 1.0


def test_legs_slower_than_predicted_never_hold_the_leg_past_the_prediction():
    assert taught([1.4] * 20).wait_s(2.0) == pytest.approx(1.85)


def test_the_hold_never_drops_below_half_the_prediction_nor_below_zero():
    lead = taught([0.1] * 20)
    assert lead.scale() == 0.5 and lead.wait_s(2.0) == pytest.approx(0.85)
    assert lead.wait_s(0.2) == 0.0


def test_cover_zero_keeps_decode_lead_s_alone():
    assert taught([0.5] * 20, cover=0.0).wait_s(2.0) == pytest.approx(1.85)


def test_only_the_last_window_of_legs_counts():
    lead = taught([0.6] * 20, window=16)
    assert lead.scale() == pytest.approx(0.6)
    for _ in range(16):
        lead.observe(1.0, 1.0)
    assert lead.scale() == 1.0


@pytest.mark.parametrize("predicted, actual", [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0), (math.inf, 1.0), (1.0, math.nan)])
def test_a_leg_without_a_usable_prediction_or_time_teaches_nothing(predicted, actual):
    lead = taught([0.7] * 7)
    lead.observe(predicted, actual)
    assert lead.scale() == 1.0  # still 7 legs: one short of min_samples

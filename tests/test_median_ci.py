"""bench/median_ci.py: the interval the benches print beside a median of repeats."""
import random

import pytest

from bench.median_ci import median_ci


def test_interval_is_the_order_statistics_of_the_binomial_table():
    # 95 % tables for the median: n=12 -> (3rd, 10th) smallest, n=24 -> (7th, 18th)
    assert median_ci([float(i) for i in range(12, 0, -1)])[1:3] == (3.0, 10.0)
    ci = median_ci([float(i) for i in range(1, 25)])
    assert (ci.low, ci.high) == (7.0, 18.0) and ci.median == 12.5 and ci.level >= 0.95


def test_too_few_values_give_the_whole_range_and_say_the_coverage_they_have():
    ci = median_ci([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (ci.low, ci.median, ci.high) == (1.0, 3.0, 5.0)
    assert ci.level == pytest.approx(1 - 2 / 32) and str(ci).endswith("covers only 94%")
    two = median_ci([2.0, 1.0])
    assert (two.low, two.high, two.level) == (1.0, 2.0, 0.5)
    six = median_ci([float(i) for i in range(6)])  # the fewest values that reach 95 %: the whole range, 96.9 %
    assert (six.low, six.high) == (0.0, 5.0) and six.level == pytest.approx(1 - 2 / 64) and "covers" not in str(six)


def test_a_skewed_noise_s_true_median_falls_inside_at_least_as_often_as_promised():
    rng = random.Random(7)
    true_median = 1.0  # of lognormal(0, sigma): e**0
    hits = 0
    for _ in range(2000):
        ci = median_ci([rng.lognormvariate(0, 0.4) for _ in range(12)])
        hits += ci.low <= true_median <= ci.high
    assert hits / 2000 >= 0.94


def test_no_values_is_an_error():
    with pytest.raises(ValueError, match="no values"):
        median_ci([])

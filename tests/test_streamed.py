"""The benches' per-token time counts tokens, not events: an answer sent partly in bursts is timed by its tokens,
and its gaps by token index share a burst's gap among its tokens."""
import math

from bench.streamed import Streamed, gaps_by_index, in_range, pace


def test_one_token_per_event_is_the_gap_between_events() -> None:
    tpot, held = pace([0.0, 0.1, 0.2, 0.3], [1, 1, 1, 1])
    assert math.isclose(tpot, 0.1) and held == 0


def test_a_burst_counts_each_of_its_tokens() -> None:
    # 6 tokens after the first event in 0.3 s: 50 ms each (counting events would say 150 ms)
    tpot, held = pace([0.0, 0.2, 0.3], [1, 5, 1])
    assert math.isclose(tpot, 0.05) and held == 1


def test_tokens_held_into_the_first_event_start_the_clock_there() -> None:
    # the first event carried 4 tokens: the time per token is taken over the 2 that came after it
    tpot, held = pace([0.5, 0.6, 0.7], [4, 1, 1])
    assert math.isclose(tpot, 0.1) and held == 1


def test_a_single_event_has_no_pace() -> None:
    tpot, held = pace([0.5], [3])
    assert math.isnan(tpot) and held == 1


def test_gaps_by_token_index_share_a_bursts_gap_among_its_tokens_and_start_after_the_first_event() -> None:
    got = Streamed(0.5, "", 0.0, 1, stamps=(0.5, 0.6, 0.8, 0.9, 1.0), counts=(2, 1, 0, 3, 1))  # one event empty
    gaps = gaps_by_index(got)
    assert list(gaps) == [1, 2, 3, 4, 5]
    assert [round(g, 6) for g in gaps.values()] == [0.1, 0.1, 0.1, 0.1, 0.1]
    assert math.isclose(in_range(gaps, 2, 4), 0.1) and in_range(gaps, 6, 9) is None

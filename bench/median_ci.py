"""How far a median of repeats can be trusted: a distribution-free confidence interval for it.

On a shared 2-core machine one prompt's time per output token, or one request's TTFT overhead, moves by 15-40 %
between repeats, so a median of a dozen says less than its two decimals suggest. The interval comes from order
statistics alone (the number of samples below the true median is Binomial(n, 1/2)), so it assumes nothing about
the shape of the noise and needs no random resampling: the same samples always print the same interval.
"""
from __future__ import annotations

import math
import statistics
from typing import NamedTuple


class MedianCI(NamedTuple):
    median: float
    low: float
    high: float
    level: float  # the interval's actual coverage: order statistics give discrete levels; below the one asked
    # when there are too few values for it (then the interval is the whole range)

    def __str__(self) -> str:
        short = f" covers only {self.level:.0%}" if self.level < 0.95 else ""
        return f"{self.median:.3f} [{self.low:.3f}, {self.high:.3f}]{short}"


def _below(n: int, j: int) -> float:
    """P(Binomial(n, 1/2) < j)."""
    return sum(math.comb(n, i) for i in range(j)) / 2 ** n


def median_ci(values: list[float], level: float = 0.95) -> MedianCI:
    """The median and the narrowest order-statistic interval [x_(j), x_(n+1-j)] covering it with at least
    `level`; with too few values for that level (n < 6 at 95 %), the whole range, with the coverage it has."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    j = 1
    while j + 1 <= n + 1 - (j + 1) and 1 - 2 * _below(n, j + 1) >= level:
        j += 1
    return MedianCI(statistics.median(xs), xs[j - 1], xs[n - j], 1 - 2 * _below(n, j))

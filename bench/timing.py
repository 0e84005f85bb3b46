"""Statistics for benchmark timings: paired ratios and a confidence interval for their median.

A shared machine's speed drifts by tens of percent within a minute, so the benchmarks time their variants in
interleaved rounds. Dividing two medians taken over the whole run still mixes in whatever drift the rounds saw;
dividing each round's two samples first (they ran seconds apart) cancels it, and the median of those paired ratios
is the figure to report. Its interval tells whether a target such as "at most 5% slower" is met or only looks met.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MedianInterval:
    """A sample median with a distribution-free interval that covers the true median with probability
    ``coverage`` (at least the confidence asked for, unless too few samples allow it; then the sample's range)."""

    median: float
    low: float
    high: float
    coverage: float

    def verdict(self, limit: float) -> str:
        """Whether the true median is at most ``limit``: "yes" when the whole interval is, "no" when none of it
        is, "undecided" when the interval straddles it."""
        if self.high <= limit:
            return "yes"
        return "no" if self.low > limit else "undecided"


def _binomial_half_cdf(k: int, n: int) -> float:
    """P(B <= k) for B ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def median_interval(values: Sequence[float], confidence: float = 0.95) -> MedianInterval:
    """The median of ``values`` and the order statistics x_(k) <= median <= x_(n+1-k) around it, with the largest k
    whose coverage 1 - 2 P(B <= k - 1), B ~ Binomial(n, 1/2), is still at least ``confidence``. The sign test's
    interval: it assumes only that the samples are independent draws of one distribution, not a normal one."""
    if not values:
        raise ValueError("median_interval needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    ordered, n = sorted(values), len(values)
    k = 1
    while k + 1 <= (n + 1) // 2 and 1.0 - 2.0 * _binomial_half_cdf(k, n) >= confidence:
        k += 1
    coverage = 1.0 - 2.0 * _binomial_half_cdf(k - 1, n)
    return MedianInterval(statistics.median(ordered), ordered[k - 1], ordered[n - k], coverage)


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Each round's sample of one variant over the same round's sample of its baseline."""
    if len(numerators) != len(denominators):
        raise ValueError(f"paired samples must come in the same rounds: {len(numerators)} against {len(denominators)}")
    return [a / b for a, b in zip(numerators, denominators, strict=True)]

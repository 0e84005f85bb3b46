"""The benchmarks' timing statistics: the sign-test interval of a median and paired per-round ratios."""

import math
import random
import sys
from pathlib import Path

import pytest

# The statistics serve the benchmarks only, so they live beside them in bench/, outside the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from timing import MedianInterval, median_interval, paired_ratios


def test_ten_samples_give_the_second_and_ninth_order_statistics():
    # n = 10: P(B <= 1) = (1 + 10) / 1024, so ranks 2 and 9 cover with 1 - 22/1024 = 0.9785 >= 0.95; ranks 3 and 8
    # would cover with 1 - 2 (1 + 10 + 45) / 1024 = 0.8906 < 0.95.
    values = [7.0, 3.0, 10.0, 1.0, 5.0, 9.0, 2.0, 8.0, 6.0, 4.0]
    interval = median_interval(values)
    assert (interval.median, interval.low, interval.high) == (5.5, 2.0, 9.0)
    assert interval.coverage == pytest.approx(1 - 22 / 1024)
    # At 80% ranks 3 and 8 suffice (0.8906), ranks 4 and 7 do not: 1 - 2 (1 + 10 + 45 + 120) / 1024 = 0.656.
    looser = median_interval(values, confidence=0.8)
    assert (looser.low, looser.high) == (3.0, 8.0)
    assert looser.coverage == pytest.approx(1 - 112 / 1024)


def test_too_few_samples_give_their_range_with_the_coverage_they_have():
    # n = 5: even min..max covers only 1 - 2 / 32 = 0.9375; one sample covers nothing.
    interval = median_interval([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (interval.median, interval.low, interval.high) == (3.0, 1.0, 5.0)
    assert interval.coverage == pytest.approx(0.9375)
    single = median_interval([2.5])
    assert (single.low, single.high, single.coverage) == (2.5, 2.5, 0.0)


def test_the_interval_covers_a_known_median_as_often_as_it_says():
    # Exponential samples (median ln 2, skewed: a normal-theory interval would be off): the share of 4000 intervals
    # of 25 samples that contain ln 2 matches the stated coverage (n = 25: ranks 8 and 18, 0.9567).
    rng = random.Random(0)
    intervals = [median_interval([rng.expovariate(1.0) for _ in range(25)]) for _ in range(4000)]
    stated = intervals[0].coverage
    assert stated == pytest.approx(0.9567, abs=1e-4)
    hit_rate = sum(i.low <= math.log(2) <= i.high for i in intervals) / len(intervals)
    assert hit_rate == pytest.approx(stated, abs=0.012)


def test_verdict_against_a_limit():
    assert MedianInterval(0.03, 0.01, 0.04, 0.95).verdict(0.05) == "yes"
    assert MedianInterval(0.04, 0.02, 0.06, 0.95).verdict(0.05) == "undecided"
    assert MedianInterval(0.07, 0.06, 0.08, 0.95).verdict(0.05) == "no"


def test_paired_ratios_divide_round_by_round():
    assert paired_ratios([2.0, 3.0, 5.0], [1.0, 2.0, 4.0]) == [2.0, 1.5, 1.25]
    with pytest.raises(ValueError, match="same rounds: 2 against 3"):
        paired_ratios([1.0, 2.0], [1.0, 2.0, 3.0])


@pytest.mark.parametrize(("values", "confidence", "message"), [([], 0.95, "at least one"), ([1.0], 1.0, "strictly")])
def test_bad_requests_are_refused(values, confidence, message):
    with pytest.raises(ValueError, match=message):
        median_interval(values, confidence)

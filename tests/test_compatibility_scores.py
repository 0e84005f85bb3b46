"""P_up / P_comp / P_1 on a worked example: the BCT row of the AdvBCT paper's table."""

import math

import pytest

from advbct.evaluation import compatibility_criterion, compatibility_scores

OLD = (75.45, 49.15, 10.03)
INDEPENDENT = (81.15, 63.85, 16.48)
BCT_SELF = (80.58, 56.34, 14.61)
BCT_CROSS = (77.37, 49.66, 11.30)


def test_paper_example():
    scores = compatibility_scores(OLD, INDEPENDENT, BCT_SELF, BCT_CROSS)
    assert scores["p_up"] == pytest.approx(48.02, abs=0.005)
    assert scores["p_comp"] == pytest.approx(54.71, abs=0.005)
    assert scores["p_1"] == pytest.approx(51.13, abs=0.005)


def test_p1_is_the_harmonic_mean_for_one_dataset():
    scores = compatibility_scores(OLD[:1], INDEPENDENT[:1], BCT_SELF[:1], BCT_CROSS[:1])
    assert scores["p_1"] == pytest.approx(2 / (1 / scores["p_up"] + 1 / scores["p_comp"]))


def test_single_dataset_by_hand():
    # self = independent -> P_up = 100 sigmoid(0) = 50; cross halfway between old and independent -> sigmoid(0.5)
    scores = compatibility_scores([40.0], [60.0], [60.0], [50.0])
    assert scores["p_up"] == pytest.approx(50.0)
    assert scores["p_comp"] == pytest.approx(100 / (1 + math.exp(-0.5)))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="one per dataset"):
        compatibility_scores(OLD, INDEPENDENT[:2], BCT_SELF, BCT_CROSS)
    with pytest.raises(ValueError, match="undefined"):
        compatibility_scores([50.0], [50.0], [55.0], [52.0])
    with pytest.raises(ValueError, match="at least one"):
        compatibility_scores([], [], [], [])
    with pytest.raises(ValueError, match="non-finite"):
        compatibility_scores([math.nan], [60.0], [55.0], [52.0])


def test_the_criterion_needs_both_margins_strictly_above_zero():
    both = compatibility_criterion(cross_margin=1.0, self_margin=0.5)
    assert both.cross and both.self_test and both.upgrade_ok
    tie = compatibility_criterion(cross_margin=0.0, self_margin=2.0)
    assert not tie.cross and tie.self_test and not tie.upgrade_ok
    weak_self = compatibility_criterion(cross_margin=0.1, self_margin=-0.1)
    assert weak_self.cross and not weak_self.upgrade_ok

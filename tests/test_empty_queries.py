"""One empty-query policy across every metric: a query with no relevant gallery item is skipped (the standard
protocols), counted as scoring 0, or refused, as ``empty_queries`` says. Hand-worked values throughout."""

import math

import pytest
import torch

from advbct.evaluation import gldv2_map, label_retrieval_metrics, revisited_map
from advbct.evaluation.metrics import NothingToScore, metrics_from_rankings

# Items 0 and 1 are class 0 and close together; item 2 is the only class-1 item, so as a query searching the
# others it has nothing relevant. Queries 0 and 1 each find the other first: AP 1, top-1 hit.
EMB = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
LABELS = torch.tensor([0, 0, 1])


def test_label_metrics_skip_count_as_zero_or_refuse_the_empty_query():
    skip = label_retrieval_metrics(EMB, LABELS, EMB, LABELS, exclude_same_index=True)
    assert skip["map"] == pytest.approx(100.0) and skip["top1"] == pytest.approx(100.0)
    zero = label_retrieval_metrics(EMB, LABELS, EMB, LABELS, exclude_same_index=True, empty_queries="zero")
    assert zero["map"] == pytest.approx(200 / 3) and zero["top1"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="1 of 3 queries have no relevant gallery item"):
        label_retrieval_metrics(EMB, LABELS, EMB, LABELS, exclude_same_index=True, empty_queries="error")
    with pytest.raises(ValueError, match="empty_queries must be one of skip, zero, error"):
        label_retrieval_metrics(EMB, LABELS, EMB, LABELS, exclude_same_index=True, empty_queries="neg")


def test_rankings_from_a_search_engine_follow_the_same_policy():
    ranks = torch.tensor([[1, 2], [0, 2], [0, 1]])  # each query's own item is not among its hits
    own = torch.tensor([0, 1, 2])
    assert metrics_from_rankings(ranks, own, LABELS)["map"] == pytest.approx(100.0)
    assert metrics_from_rankings(ranks, own, LABELS, "zero")["map"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="1 of 3 queries"):
        metrics_from_rankings(ranks, own, LABELS, "error")
    with pytest.raises(NothingToScore):
        metrics_from_rankings(ranks[2:], own[2:], LABELS)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        metrics_from_rankings(torch.tensor([[1, 5]]), own[:1], LABELS)


def test_revisited_protocols_follow_the_same_policy():
    # Query 0: easy image 0 ranked first (AP 1 under every protocol that counts it). Query 1: only a hard image,
    # so it is empty under Easy; under Medium its hard image 1 is ranked second, and revisitop's trapezoid gives
    # AP = (0 / 1 + 1 / 2) / 2 = 0.25.
    ranks = torch.tensor([[0, 1], [0, 1]])
    gnd = [{"easy": [0], "hard": [], "junk": []}, {"easy": [], "hard": [1], "junk": []}]
    skip = revisited_map(ranks, gnd)
    assert skip["easy"]["map"] == pytest.approx(100.0)
    assert skip["medium"]["map"] == pytest.approx(100 * (1 + 0.25) / 2)
    zero = revisited_map(ranks, gnd, empty_queries="zero")
    assert zero["easy"]["map"] == pytest.approx(50.0) and zero["easy"]["mp@1"] == pytest.approx(50.0)
    assert zero["medium"] == pytest.approx(skip["medium"])  # no query is empty under Medium
    with pytest.raises(ValueError, match="1 of 2 queries"):
        revisited_map(ranks, gnd, empty_queries="error")
    # A protocol no query can be scored under reports NaN, as revisitop does, and the others still report.
    only_hard = revisited_map(ranks[1:], gnd[1:])
    assert math.isnan(only_hard["easy"]["map"]) and only_hard["hard"]["map"] == pytest.approx(25.0)


def test_gldv2_follows_the_same_policy():
    # Row 0 finds its landmark's index row 1 first (AP 1); row 1 is listed with no relevant row; row 2 is not
    # this solution's query at all and never counts.
    ranks = torch.tensor([[1, 0], [0, 1], [1, 0]])
    solution = {0: [1], 1: []}
    assert gldv2_map(ranks, solution, k=2) == pytest.approx(100.0)
    assert gldv2_map(ranks, solution, k=2, empty_queries="zero") == pytest.approx(50.0)
    with pytest.raises(ValueError, match="1 of 2 queries"):
        gldv2_map(ranks, solution, k=2, empty_queries="error")
    with pytest.raises(NothingToScore):
        gldv2_map(ranks, {1: []}, k=2)

"""The backfill curve: hand-worked galleries for the curve, the orders, the calibrated merge and the negative flips,
and the live-ranking metrics against the exact ones."""

import math

import numpy as np
import pytest
import torch

from advbct.evaluation import label_retrieval_metrics
from advbct.evaluation.backfill import (
    GalleryState,
    PlattScaling,
    ScoreCalibration,
    backfill_curve,
    backfill_order,
    fit_calibration,
    fit_platt,
    mixed_similarity,
    negative_flip_rate,
    refreshed_count,
    refreshed_mask,
)
from advbct.evaluation.metrics import QueryScores, label_retrieval_scores, metrics_from_rankings
from advbct.evaluation.search import exact_search

# Four items of two classes. The new model puts class 0 near the x-axis and class 1 near the y-axis; the old
# model's item 0 looks like class 1 and its item 2 like class 0 to a new query.
NEW = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
OLD = torch.tensor([[0.0, 1.0], [1.0, 0.2], [1.0, 0.05], [0.2, 1.0]])
LABELS = torch.tensor([0, 0, 1, 1])
ORDER = torch.tensor([2, 0, 1, 3])


def test_curve_on_a_hand_worked_gallery():
    curve = backfill_curve(NEW, OLD, NEW, LABELS, ORDER, fractions=(0.0, 0.5, 1.0))
    # t = 0, the old gallery: query 0 ranks items 2 (wrong), 1 (right), 3: AP 1/2; query 1 ranks 2, 3, 0: AP 1/3;
    # query 2 ranks 0, 3, 1: AP 1/2; query 3 ranks 0, 1, 2: AP 1/3. mAP = (1/2 + 1/3 + 1/2 + 1/3) / 4 = 5/12.
    # t = 0.5, items 2 and 0 re-embedded: every query finds its one relevant item first. t = 1: the same.
    assert curve.map == pytest.approx((100 * 5 / 12, 100.0, 100.0))
    assert curve.top1 == pytest.approx((0.0, 100.0, 100.0))
    assert curve.auc_map == pytest.approx((100 * 5 / 12 + 200) / 3)
    assert curve.min_map == pytest.approx(100 * 5 / 12)
    assert curve.to_json()["auc_map"] == pytest.approx(curve.auc_map)


def mixed_gallery(old, new, order, fraction):
    """The mixed gallery as a tensor, for the references below."""
    return torch.where(refreshed_mask(old.shape[0], order, fraction).unsqueeze(1), new, old)


def random_order(n, seed):
    return backfill_order("random", GalleryState(torch.zeros(n, 2), seed=seed))


def test_the_first_fraction_of_the_order_is_re_embedded():
    assert torch.equal(refreshed_mask(4, ORDER, 0.5), torch.tensor([True, False, True, False]))
    assert refreshed_count(10, 0.25) == 2 and refreshed_count(10, 0.35) == 4
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        refreshed_count(10, 1.5)
    with pytest.raises(ValueError, match="each of the 4 gallery items once"):
        refreshed_mask(4, ORDER[:3], 0.5)
    with pytest.raises(ValueError, match="each of the 4 gallery items once"):
        refreshed_mask(4, torch.tensor([0, 0, 1, 2]), 0.5)


def test_random_order_is_a_seeded_permutation():
    a, b = random_order(50, 3), random_order(50, 3)
    assert torch.equal(a, b) and not torch.equal(a, random_order(50, 4))
    assert torch.equal(a.sort().values, torch.arange(50))


# Three stored old embeddings, two old classes whose classifier rows and centres are the axes.
OLD3 = torch.tensor([[2.0, 0.0], [1.0, 1.0], [1.0, 0.1]])
AXES = torch.eye(2)


def test_uncertainty_order_puts_the_least_certain_old_prediction_first():
    # Logits (2, 0), (1, 1), (1, 0.1): item 1's softmax is uniform (entropy ln 2, the most), item 2's
    # (0.71, 0.29) is less sure than item 0's (0.88, 0.12).
    order = backfill_order("uncertainty", GalleryState(OLD3, old_classifier=lambda emb: emb @ AXES.T))
    assert order.tolist() == [1, 2, 0]


def test_centre_distance_order_puts_the_farthest_from_any_centre_first():
    # Normalised: item 0 = (1, 0) sits on centre 0 (distance 0); item 1 = (0.707, 0.707) is 0.765 from both;
    # item 2 = (0.995, 0.0995) is 0.0998 from centre 0.
    order = backfill_order("centre-distance", GalleryState(OLD3, old_centres=AXES))
    assert order.tolist() == [1, 2, 0]


def test_oracle_order_puts_the_largest_change_first_and_ties_in_gallery_order():
    # Normalised new minus old: item 0 moves 90 degrees (sqrt 2), item 1 not at all, item 2 by 90 degrees too.
    new = torch.tensor([[0.0, 1.0], [1.0, 1.0], [-0.1, 1.0]])
    old = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.1]])
    assert backfill_order("oracle", GalleryState(old, new=new)).tolist() == [0, 2, 1]


def test_orders_name_what_they_miss():
    with pytest.raises(ValueError, match="classifier"):
        backfill_order("uncertainty", GalleryState(OLD3))
    with pytest.raises(ValueError, match="unknown backfill order 'fifo'"):
        backfill_order("fifo", GalleryState(OLD3))


def test_calibrated_merge_ranks_a_relevant_old_item_above_an_irrelevant_new_one():
    # Item 0 is the query (re-embedded, class 0). Item 1, class 0, still holds its old vector, at cosine 0.5 from
    # the query; item 2, class 1, is re-embedded at cosine 0.7. Raw cosine ranks 2 before 1: AP 1/2, top-1 wrong.
    # Calibrated: item 1's log-odds 10 * 0.5 - 3 = 2 beat item 2's 10 * 0.7 - 8 = -1: AP 1, top-1 right.
    query = torch.tensor([[1.0, 0.0]])
    new = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, math.sqrt(1 - 0.49)]])
    old = torch.tensor([[0.0, 1.0], [0.5, math.sqrt(1 - 0.25)], [0.0, 1.0]])
    labels, order, probe = torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]), torch.tensor([0])
    calibration = ScoreCalibration(same=PlattScaling(10.0, -8.0), cross=PlattScaling(10.0, -3.0))
    raw = backfill_curve(query, old, new, labels, order, (2 / 3,), probe)
    merged = backfill_curve(query, old, new, labels, order, (2 / 3,), probe, calibration=calibration)
    assert raw.map == pytest.approx((50.0,)) and raw.top1 == (0.0,)
    assert merged.map == pytest.approx((100.0,)) and merged.top1 == (100.0,)
    assert (raw.merge, merged.merge) == ("raw", "calibrated")


def test_calibration_changes_nothing_on_a_gallery_of_one_generation():
    gen = torch.Generator().manual_seed(5)
    old, new, labels = torch.randn(30, 4, generator=gen), torch.randn(30, 4, generator=gen), torch.arange(30) % 3
    calibration = ScoreCalibration(same=PlattScaling(4.0, -9.0), cross=PlattScaling(20.0, 1.0))
    order = random_order(30, 0)
    raw = backfill_curve(new, old, new, labels, order, (0.0, 1.0))
    merged = backfill_curve(new, old, new, labels, order, (0.0, 1.0), calibration=calibration)
    assert merged.map == pytest.approx(raw.map) and merged.top1 == pytest.approx(raw.top1)


def test_platt_fit_recovers_two_known_rates():
    # Similarity 0.2 with 1 of 4 pairs relevant, 0.6 with 3 of 4: the logistic fit passes through both rates, so
    # scale = (logit 0.75 - logit 0.25) / 0.4 = 5 ln 3 and bias = logit 0.25 - 0.2 scale = -2 ln 3.
    sims = torch.tensor([0.2] * 4 + [0.6] * 4)
    relevant = torch.tensor([True, False, False, False, True, True, True, False])
    fit = fit_platt(sims, relevant)
    assert fit.scale == pytest.approx(5 * math.log(3), rel=1e-3)
    assert fit.bias == pytest.approx(-2 * math.log(3), rel=1e-3)
    with pytest.raises(ValueError, match="both relevant and irrelevant"):
        fit_platt(sims, torch.zeros(8, dtype=torch.bool))
    # Relevance falling with similarity would reverse the part's own ranking: the slope stays positive.
    assert fit_platt(sims, ~relevant).scale == pytest.approx(1e-3)


def test_calibration_from_a_split_reads_same_model_pairs_as_more_telling():
    # The new model separates the classes (each class on its own axis plus small noise); the old one barely does.
    gen = torch.Generator().manual_seed(2)
    labels = torch.arange(60) % 3
    new = torch.eye(3)[labels] + 0.1 * torch.randn(60, 3, generator=gen)
    old = 0.2 * torch.eye(3)[labels] + torch.randn(60, 3, generator=gen)
    calibration = fit_calibration(new, new, old, labels)
    assert calibration.same.scale > calibration.cross.scale > 0
    assert ScoreCalibration.from_json(calibration.to_json()) == calibration


def test_negative_flips_by_hand():
    # Before: queries 0 and 1 right at top-1. After: query 0 still right, 1 wrong, 2 newly right, 3 unscored.
    def scores(top1, scored):
        hits = torch.tensor(top1)
        return QueryScores(hits.double(), hits.double(), {1: hits}, torch.tensor(scored))

    before = scores([True, True, False, True], [True, True, True, True])
    after = scores([True, False, True, False], [True, True, True, False])
    assert negative_flip_rate(before, after) == pytest.approx(100 / 3)


def test_curve_counts_negative_flips_against_the_old_system():
    # Against a baseline that is right everywhere (the new model on its own gallery), the old gallery (t = 0)
    # gets every top-1 wrong (see the hand-worked curve above): 100% flips; from t = 0.5 on, none.
    baseline = label_retrieval_scores(NEW, LABELS, NEW, LABELS, exclude_same_index=True, ks=(1,))
    curve = backfill_curve(NEW, OLD, NEW, LABELS, ORDER, (0.0, 0.5, 1.0), baseline=baseline)
    assert curve.negative_flips == pytest.approx((100.0, 0.0, 0.0))
    assert curve.max_negative_flips == pytest.approx(100.0)


def test_curve_ends_are_the_cross_and_self_tests():
    gen = torch.Generator().manual_seed(0)
    old, new = torch.randn(60, 8, generator=gen), torch.randn(60, 8, generator=gen)
    labels = torch.arange(60) % 5
    curve = backfill_curve(new, old, new, labels, random_order(60, 0))
    cross = label_retrieval_metrics(new, labels, old, labels, exclude_same_index=True)
    own = label_retrieval_metrics(new, labels, new, labels, exclude_same_index=True)
    assert curve.fractions == tuple(i / 10 for i in range(11))
    assert curve.map[0] == pytest.approx(cross["map"]) and curve.map[-1] == pytest.approx(own["map"])
    assert curve.top1[0] == pytest.approx(cross["top1"]) and curve.top1[-1] == pytest.approx(own["top1"])


def _reference_ap(query, own, gallery, labels):
    """Per-query AP by an explicit ranking in numpy, the query's own item left out."""
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    sims = g @ (query / np.linalg.norm(query))
    ranked = [j for j in np.argsort(-sims, kind="stable") if j != own]
    relevant = [labels[j] == labels[own] for j in ranked]
    hits = np.cumsum(relevant)
    return sum(hits[i] / (i + 1) for i in range(len(ranked)) if relevant[i]) / sum(relevant), float(relevant[0])


def test_a_probe_of_queries_scores_as_the_reference_does():
    gen = torch.Generator().manual_seed(1)
    old, new = torch.randn(40, 6, generator=gen), torch.randn(40, 6, generator=gen)
    labels = torch.arange(40) % 4
    probe, order = torch.tensor([3, 17, 22, 39]), random_order(40, 2)
    curve = backfill_curve(new[probe], old, new, labels, order, fractions=(0.3,), query_items=probe)
    gallery = mixed_gallery(old, new, order, 0.3).numpy()
    refs = [_reference_ap(new[i].numpy(), int(i), gallery, labels.numpy()) for i in probe]
    assert curve.map[0] == pytest.approx(100 * np.mean([ap for ap, _ in refs]))
    assert curve.top1[0] == pytest.approx(100 * np.mean([top for _, top in refs]))


def test_metrics_from_rankings_by_hand():
    # Gallery labels 0 0 1 0; query = item 0 (class 0), its ranking 2, 0 (itself, left out), 3, 1:
    # relevant items 3 and 1 at positions 2 and 3 once item 0 is dropped: AP = (1/2 + 2/3) / 2, top-1 wrong.
    labels = torch.tensor([0, 0, 1, 0])
    out = metrics_from_rankings(torch.tensor([[2, 0, 3, 1]]), torch.tensor([0]), labels)
    assert out["map"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2) and out["top1"] == 0.0
    # Truncated to two hits: item 1 is never found, so it adds nothing: AP = (1/2) / 2.
    out = metrics_from_rankings(torch.tensor([[2, 3]]), torch.tensor([0]), labels)
    assert out["map"] == pytest.approx(100 * 0.25)


def test_metrics_from_full_rankings_equal_the_exact_metrics():
    gen = torch.Generator().manual_seed(4)
    emb, labels = torch.randn(50, 8, generator=gen), torch.arange(50) % 6
    _, ranked = exact_search(emb, emb, k=50)
    out = metrics_from_rankings(ranked, torch.arange(50), labels)
    exact = label_retrieval_metrics(emb, labels, emb, labels, exclude_same_index=True)
    assert out["map"] == pytest.approx(exact["map"]) and out["top1"] == pytest.approx(exact["top1"])


def test_a_shallow_calibration_still_tells_close_cosines_apart():
    # Cosines 0.5 and 0.50002 of two old items under a slope of 1e-3 and a bias of -5: as log-odds they differ by
    # 2e-8, below float32's spacing near 5 (4.8e-7); the ranking must still put the second first.
    query = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, math.sqrt(0.75)], [0.50002, math.sqrt(1 - 0.50002**2)]])
    calibration = ScoreCalibration(same=PlattScaling(50.0, -40.0), cross=PlattScaling(1e-3, -5.0))
    scores = mixed_similarity(query, old, old, torch.tensor([False, False]), calibration)(0, 1)
    assert scores[0, 1] > scores[0, 0]

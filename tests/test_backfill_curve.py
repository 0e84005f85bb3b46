"""The backfill curve: a hand-worked gallery, and the live-ranking metrics against the exact ones."""

import numpy as np
import pytest
import torch

from advbct.evaluation import label_retrieval_metrics
from advbct.evaluation.backfill import backfill_curve, backfill_order, mixed_gallery, refreshed_count
from advbct.evaluation.metrics import metrics_from_rankings
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


def test_mixed_gallery_takes_the_first_fraction_of_the_order_from_the_new_embeddings():
    mixed = mixed_gallery(OLD, NEW, ORDER, 0.5)
    assert torch.equal(mixed, torch.stack([NEW[0], OLD[1], NEW[2], OLD[3]]))
    assert refreshed_count(10, 0.25) == 2 and refreshed_count(10, 0.35) == 4
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        refreshed_count(10, 1.5)
    with pytest.raises(ValueError, match="each of the 4 gallery items once"):
        mixed_gallery(OLD, NEW, ORDER[:3], 0.5)


def test_order_is_a_seeded_permutation():
    a, b = backfill_order(50, 3), backfill_order(50, 3)
    assert torch.equal(a, b) and not torch.equal(a, backfill_order(50, 4))
    assert torch.equal(a.sort().values, torch.arange(50))


def test_curve_ends_are_the_cross_and_self_tests():
    gen = torch.Generator().manual_seed(0)
    old, new = torch.randn(60, 8, generator=gen), torch.randn(60, 8, generator=gen)
    labels = torch.arange(60) % 5
    curve = backfill_curve(new, old, new, labels, backfill_order(60, 0))
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
    probe, order = torch.tensor([3, 17, 22, 39]), backfill_order(40, 2)
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

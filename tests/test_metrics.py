"""Label-retrieval metrics: hand-computed rankings and a per-query reference implementation."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from advbct.evaluation import average_precision_from_positions, label_retrieval_metrics
from advbct.evaluation.metrics import relevant_positions, relevant_positions_by_sort


def test_average_precision_by_hand():
    # relevant at ranks 1 and 3 of 4: AP = (1/1 + 2/3) / 2; R = 2: AP@R = (1/1) / 2
    inf = float("inf")
    ap, ap_r = average_precision_from_positions(torch.tensor([[1.0, 3.0]]), torch.tensor([2]))
    assert ap.item() == pytest.approx((1 + 2 / 3) / 2)
    assert ap_r.item() == pytest.approx(0.5)
    # a second row with one relevant item fewer is padded with inf: ranks 2 and 3 / rank 4 alone
    ap, ap_r = average_precision_from_positions(torch.tensor([[2.0, 3.0], [4.0, inf]]), torch.tensor([2, 1]))
    assert ap.tolist() == pytest.approx([(1 / 2 + 2 / 3) / 2, 1 / 4])
    assert ap_r.tolist() == pytest.approx([(1 / 2) / 2, 0.0])


def test_metrics_on_hand_made_embeddings():
    # 1-D-like embeddings on the unit circle; query 0 (class a) ranks: item 1 (a), item 2 (b), item 3 (a).
    angles = torch.tensor([0.0, 0.1, 0.3, 0.5])
    emb = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.tensor([0, 0, 1, 0])
    out = label_retrieval_metrics(emb[:1], labels[:1], emb[1:], labels[1:], ks=(1, 2))
    assert out["map"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert out["map_at_r"] == pytest.approx(100 * 0.5)
    assert out["top1"] == 100.0 and out["top2"] == 100.0


def reference_metrics(q, ql, g, gl, exclude_same):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    aps, aprs, top1 = [], [], []
    for i in range(len(q)):
        sims = g @ q[i]
        idx = [j for j in np.argsort(-sims, kind="stable") if not (exclude_same and j == i)]
        rel = [gl[j] == ql[i] for j in idx]
        n = sum(rel)
        if n == 0:
            continue
        hits, ap, apr = 0, 0.0, 0.0
        for k, r in enumerate(rel, start=1):
            if r:
                hits += 1
                ap += hits / k
                if k <= n:
                    apr += hits / k
        aps.append(ap / n)
        aprs.append(apr / n)
        top1.append(float(rel[0]))
    if not aps:
        return (float("nan"),) * 3
    return 100 * np.mean(aps), 100 * np.mean(aprs), 100 * np.mean(top1)


def _smallest_similarity_gap(queries: np.ndarray, gallery: np.ndarray) -> float:
    q = queries / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery.astype(np.float64), axis=1, keepdims=True)
    sims = np.sort(q @ g.T, axis=1)
    return float(np.diff(sims, axis=1).min()) if sims.shape[1] > 1 else np.inf


def test_exact_ties_rank_in_gallery_order():
    # Gallery items 0 (class b) and 1 (class a) are the same vector. In gallery order the miss comes first:
    # query a ranks b, a, a -> AP = (1/2 + 2/3) / 2, top-1 = 0. Swapping the two items' labels puts the hit first.
    gallery = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[1.0, 0.2]])
    out = label_retrieval_metrics(query, torch.tensor([0]), gallery, torch.tensor([1, 0, 0]), ks=(1,))
    assert out["map"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert out["top1"] == 0.0
    out = label_retrieval_metrics(query, torch.tensor([0]), gallery, torch.tensor([0, 1, 0]), ks=(1,))
    assert out["map"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert out["top1"] == 100.0


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 40),
    dim=st.integers(2, 6),
    classes=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    exclude=st.booleans(),
    chunk=st.integers(1, 16),
)
def test_matches_reference_on_random_data(n, dim, classes, seed, exclude, chunk):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    other = rng.normal(size=(n, dim)).astype(np.float32)
    labels = rng.integers(0, classes, size=n)
    # float32 rounding may order two similarities closer than this either way; such near-ties are not a ranking
    # question the reference can settle (exact ties are tested separately).
    assume(_smallest_similarity_gap(other, emb) > 1e-5)
    expected = reference_metrics(other, labels, emb, labels, exclude)
    args = (torch.from_numpy(other), torch.from_numpy(labels), torch.from_numpy(emb), torch.from_numpy(labels))
    if np.isnan(expected[0]):
        with pytest.raises(ValueError, match="no query"):
            label_retrieval_metrics(*args, exclude_same_index=exclude, chunk_size=chunk)
        return
    out = label_retrieval_metrics(*args, exclude_same_index=exclude, chunk_size=chunk)
    assert out["map"] == pytest.approx(expected[0], abs=1e-4)
    assert out["map_at_r"] == pytest.approx(expected[1], abs=1e-4)
    assert out["top1"] == pytest.approx(expected[2], abs=1e-4)


@pytest.mark.parametrize("exclude", [False, True])
def test_many_exact_ties_match_the_stable_reference(exclude):
    # One-hot gallery vectors repeat, so each query's score for gallery item j is exactly one of its own four
    # coordinates: relevant and irrelevant items tie over and over, and gallery order must break every tie.
    rng = np.random.default_rng(3)
    gallery = np.eye(4, dtype=np.float32)[rng.integers(0, 4, size=30)]
    labels = rng.integers(0, 3, size=30)
    queries = rng.normal(size=(30, 4)).astype(np.float32)
    expected = reference_metrics(queries, labels, gallery, labels, exclude)
    args = (torch.from_numpy(queries), torch.from_numpy(labels), torch.from_numpy(gallery), torch.from_numpy(labels))
    out = label_retrieval_metrics(*args, exclude_same_index=exclude, chunk_size=7)
    assert out["map"] == pytest.approx(expected[0], abs=1e-9)
    assert out["map_at_r"] == pytest.approx(expected[1], abs=1e-9)
    assert out["top1"] == pytest.approx(expected[2], abs=1e-9)


def test_counting_and_sorting_agree_with_and_without_ties():
    torch.manual_seed(0)
    sims = torch.randn(16, 200)
    counted = torch.ones(16, 200, dtype=torch.bool)
    counted[torch.arange(16), torch.arange(16)] = False
    relevant = (torch.rand(16, 200) < 0.1) & counted
    relevant[3] = False  # a row without relevant items
    fast = relevant_positions(sims, relevant, counted)
    assert torch.equal(fast, relevant_positions_by_sort(sims, relevant, counted))
    assert torch.isinf(fast[3]).all()
    # Irrelevant items that score exactly what relevant ones do, before and after them in gallery order: the
    # stable sort's positions, not the counting's, whatever row they fall in.
    for row in (5, 9):
        hits = relevant[row].nonzero().squeeze(1)
        misses = (~relevant[row] & counted[row]).nonzero().squeeze(1)
        sims[row, misses[0]] = sims[row, hits[-1]]
        sims[row, misses[-1]] = sims[row, hits[0]]
    tied = relevant_positions(sims, relevant, counted)
    assert torch.equal(tied, relevant_positions_by_sort(sims, relevant, counted))
    assert not torch.equal(tied[5], fast[5])


def test_non_finite_embeddings_are_refused():
    emb = torch.randn(3, 4)
    emb[1, 2] = float("nan")
    with pytest.raises(ValueError, match="gallery embeddings contain NaN"):
        label_retrieval_metrics(torch.randn(2, 4), torch.zeros(2), emb, torch.zeros(3))


def test_dimension_mismatch_is_refused():
    with pytest.raises(ValueError, match="dim 4, gallery embeddings 3"):
        label_retrieval_metrics(torch.randn(2, 4), torch.zeros(2), torch.randn(2, 3), torch.zeros(2))

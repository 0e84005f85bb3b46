"""Label-retrieval metrics: hand-computed rankings and a per-query reference implementation."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from advbct.evaluation import average_precision_from_relevance, label_retrieval_metrics


def test_average_precision_by_hand():
    # relevant at ranks 1 and 3 of 4: AP = (1/1 + 2/3) / 2; R = 2: AP@R = (1/1) / 2
    ap, ap_r = average_precision_from_relevance(torch.tensor([[1, 0, 1, 0]], dtype=torch.bool))
    assert ap.item() == pytest.approx((1 + 2 / 3) / 2)
    assert ap_r.item() == pytest.approx(0.5)
    ap, ap_r = average_precision_from_relevance(torch.tensor([[0, 1, 1]], dtype=torch.bool))
    assert ap.item() == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert ap_r.item() == pytest.approx((1 / 2) / 2)


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


def test_dimension_mismatch_is_refused():
    with pytest.raises(ValueError, match="dim 4, gallery embeddings 3"):
        label_retrieval_metrics(torch.randn(2, 4), torch.zeros(2), torch.randn(2, 3), torch.zeros(2))

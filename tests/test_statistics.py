"""Old-class statistics: the 1.5-IQR radius rule and the centres, checked by hand and against numpy."""

import json

import numpy as np
import pytest
import torch

from advbct.compat.statistics import (
    StatisticsError,
    compute_class_statistics,
    iqr_inlier_radii,
    iqr_max_radius,
    load_statistics,
    radius_summary,
    save_statistics,
)


def test_iqr_rule_by_hand():
    # class 0: [0.1, 0.2, 0.3, 0.4, 2.0] -> Q1 0.2, Q3 0.4, IQR 0.2, fences [-0.1, 0.7]: 2.0 dropped -> 0.4
    # class 1: three samples -> no filtering -> the far 5.0 stays
    # class 2: one sample -> its own distance; class 3: no samples -> 0
    dist = torch.tensor([0.3, 2.0, 0.1, 5.0, 0.2, 0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 0, 1, 0, 1, 2])
    radii = iqr_max_radius(dist, labels, 4)
    assert radii.tolist() == pytest.approx([0.4, 5.0, 0.3, 0.0])


def test_inlier_min_median_and_max_by_hand():
    # class 0: [0.1, 0.2, 0.3, 0.4, 2.0] -> 2.0 dropped (see above) -> inliers 0.1..0.4: min 0.1, median 0.25, max 0.4
    # class 1: [5.0, 0.1, 0.2], too few to filter -> min 0.1, median 0.2, max 5.0
    # class 2: one sample 0.3 -> all three 0.3; class 3: no samples -> 0
    # class 4: [0.01, 1.0, 1.1, 1.2, 1.3] -> Q1 1.0, Q3 1.2, IQR 0.2, lower fence 0.7: the small 0.01 is an outlier
    #          too -> inliers 1.0..1.3: min 1.0, median (1.1 + 1.2) / 2 = 1.15, max 1.3
    dist = torch.tensor([0.3, 2.0, 0.1, 5.0, 0.2, 0.1, 0.4, 0.2, 0.3, 1.2, 0.01, 1.3, 1.0, 1.1], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 0, 1, 0, 1, 2, 4, 4, 4, 4, 4])
    radii = iqr_inlier_radii(dist, labels, 5)
    assert radii.minimum.tolist() == pytest.approx([0.1, 0.1, 0.3, 0.0, 1.0])
    assert radii.median.tolist() == pytest.approx([0.25, 0.2, 0.3, 0.0, 1.15])
    assert radii.maximum.tolist() == pytest.approx([0.4, 5.0, 0.3, 0.0, 1.3])


def test_iqr_fence_is_inclusive():
    # [1, 2, 3, 4, x] with x >= 4: quartiles at positions 1 and 3 -> Q1 2, Q3 4, IQR 2, upper fence 7.0,
    # so x = 7.0 is kept and x = 7.01 is dropped.
    kept = iqr_max_radius(torch.tensor([1.0, 2.0, 3.0, 4.0, 7.0]), torch.zeros(5, dtype=torch.long), 1)
    dropped = iqr_max_radius(torch.tensor([1.0, 2.0, 3.0, 4.0, 7.01]), torch.zeros(5, dtype=torch.long), 1)
    assert kept.item() == pytest.approx(7.0)
    assert dropped.item() == pytest.approx(4.0)


def test_iqr_rule_matches_numpy_reference():
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 12, (400,), generator=gen)
    dist = torch.rand(400, generator=gen, dtype=torch.float64) ** 3 * 4
    radii = iqr_max_radius(dist, labels, 13)
    for c in range(13):
        d = dist[labels == c].numpy()
        if d.size == 0:
            assert radii[c] == 0
            continue
        if d.size >= 4:
            q1, q3 = np.percentile(d, [25, 75])
            d = d[(d >= q1 - 1.5 * (q3 - q1)) & (d <= q3 + 1.5 * (q3 - q1))]
        assert radii[c].item() == pytest.approx(d.max())


def test_centres_are_means_of_normalised_embeddings():
    # class 0: one-hot e1..e4 scaled differently -> normalised to e1..e4 -> centre (1/4,)*4, distance sqrt(0.75)
    emb = torch.tensor([[3.0, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 2, 0], [0, 0, 0, 7], [1, 1, 0, 0], [5, 5, 0, 0]])
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    stats = compute_class_statistics(emb, labels, 4, "abc", ("a", "b", "c", "d"))
    assert stats.centres[0].tolist() == pytest.approx([0.25] * 4)
    assert stats.radii[0].item() == pytest.approx(0.75**0.5)
    # single-sample classes: centre = the normalised sample, distance 0, and no usable radius
    assert stats.centres[1].tolist() == pytest.approx([2**-0.5, 2**-0.5, 0, 0])
    assert stats.has_radius.tolist() == [True, False, False, False]
    assert stats.counts.tolist() == [4, 1, 1, 0]


def test_statistics_file_is_keyed_to_its_checkpoint(tmp_path):
    stats = compute_class_statistics(torch.randn(20, 8), torch.arange(20) % 4, 4, "old-model-1", tuple("abcd"))
    path = tmp_path / "stats.pt"
    save_statistics(stats, path)
    loaded = load_statistics(path, "old-model-1")
    assert torch.equal(loaded.centres, stats.centres) and loaded.class_names == tuple("abcd")
    assert torch.equal(loaded.min_radii, stats.min_radii) and torch.equal(loaded.median_radii, stats.median_radii)
    with pytest.raises(StatisticsError, match="computed from old model old-model-1"):
        load_statistics(path, "another-model")
    with pytest.raises(StatisticsError, match="not found"):
        load_statistics(tmp_path / "missing.pt")


def test_a_statistics_file_without_the_inlier_radii_asks_for_new_statistics(tmp_path):
    stats = compute_class_statistics(torch.randn(8, 2), torch.arange(8) % 2, 2, "m")
    blob = {"meta": json.dumps({"old_model_id": "m", "class_names": []}), "centres": stats.centres,
            "radii": stats.radii, "angular_radii": stats.angular_radii, "counts": stats.counts,
            "has_radius": stats.has_radius}  # fmt: skip
    torch.save(blob, tmp_path / "old.pt")
    with pytest.raises(StatisticsError, match=r"lacks min_radii, median_radii .* re-run `advbct stats`"):
        load_statistics(tmp_path / "old.pt")


def test_a_statistics_file_holding_other_objects_is_not_unpickled(tmp_path):
    torch.save({"meta": "{}", "payload": _Pickled()}, tmp_path / "evil.pt")
    with pytest.raises(StatisticsError, match="cannot read statistics file"):
        load_statistics(tmp_path / "evil.pt")
    assert _UNPICKLED == []
    torch.load(tmp_path / "evil.pt", weights_only=False)  # a full unpickle would have run the object's code
    assert _UNPICKLED == [True]


_UNPICKLED: list[bool] = []


def _record_unpickling() -> None:
    _UNPICKLED.append(True)


class _Pickled:
    """Unpickling this object calls ``_record_unpickling``: the weights-only loader must refuse it instead."""

    def __reduce__(self):
        return _record_unpickling, ()


def test_radius_summary_by_hand():
    # Unit vectors: class 0 at (1, 0) and (0, 1) -> centre (0.5, 0.5), both at distance sqrt(0.5) = 0.7071;
    # class 1 at (1, 0) and (-1, 0) -> centre (0, 0), both at distance 1; class 2 has one sample (no radius).
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    stats = compute_class_statistics(emb, torch.tensor([0, 0, 1, 1, 2]), 3, "m")
    summary = radius_summary(stats, tau=0.8)
    assert summary.classes == 2
    assert summary.minimum == pytest.approx(0.5**0.5)
    assert summary.median == pytest.approx((0.5**0.5 + 1) / 2)
    assert summary.maximum == pytest.approx(1.0)
    assert summary.above_tau == 1
    assert "1 above tau = 0.8" in summary.describe()


def test_radius_summary_refuses_statistics_without_radii():
    stats = compute_class_statistics(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), 2, "m")
    with pytest.raises(StatisticsError, match="no class has a radius"):
        radius_summary(stats, tau=1.0)


@pytest.mark.parametrize(
    ("embeddings", "labels", "message"),
    [
        (torch.randn(5, 3), torch.zeros(4, dtype=torch.long), "5 embeddings but 4 labels"),
        (torch.randn(5), torch.zeros(5, dtype=torch.long), r"shape \(N, D\)"),
        (torch.randn(3, 2), torch.tensor([0, 1, 3]), r"labels must lie in 0..2, found 0..3"),
        (torch.randn(3, 2), torch.tensor([0, -1, 2]), r"labels must lie in 0..2, found -1..2"),
    ],
)
def test_bad_inputs_are_refused_with_what_is_wrong(embeddings, labels, message):
    with pytest.raises(ValueError, match=message):
        compute_class_statistics(embeddings, labels, 3)

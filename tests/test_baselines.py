"""Baseline compatibility losses on tiny 2-D tensors with values worked out by hand."""

import math

import pytest
import torch

from advbct.compat import (
    CompatBatch,
    CompatContext,
    CompatError,
    CompatibilityMethod,
    compared_methods,
    compute_class_statistics,
    create,
    list_methods,
    method_info,
    methods_of_kind,
    reference_method,
    register_method,
)
from advbct.compat.baselines import hot_refresh_loss, l2_regression_loss
from advbct.models.heads import SoftmaxHead
from test_host_sync import make_context


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def batch(new, labels, old=None, classifier=None):
    return CompatBatch(
        torch.tensor(new), torch.tensor(labels), None if old is None else torch.tensor(old), 0.5, 0, 2, classifier
    )


def test_l2_regression_is_the_mean_squared_error_of_normalised_embeddings():
    new, old = torch.tensor([[3.0, 4.0], [0.0, 2.0]]), torch.tensor([[0.0, 5.0], [1.0, 0.0]])
    # normalised: new (0.6, 0.8), (0, 1); old (0, 1), (1, 0). Squared differences 0.36 + 0.04 and 1 + 1:
    # 2.4 over 2 samples x 2 dimensions = 0.6. Lengths do not count, so scaled inputs give the same.
    assert l2_regression_loss(new, old).item() == pytest.approx(0.6, rel=1e-6)
    assert l2_regression_loss(7 * new, 0.1 * old).item() == pytest.approx(0.6, rel=1e-6)
    method = create("l2", CompatContext(embedding_dim=2, num_classes=2), weight=2.0)
    out = method(CompatBatch(new, torch.tensor([0, 1]), old, 0.5, 0, 2))
    assert out.parts["l2"].item() == pytest.approx(0.6, rel=1e-6)
    assert out.total.item() == pytest.approx(1.2, rel=1e-6)


def test_bct_uses_old_classifier_on_old_classes_only():
    head = SoftmaxHead(2, 2)
    head.weight.data = torch.eye(2)
    ctx = CompatContext(embedding_dim=2, num_classes=3, old_head=head, old_head_classes=(0, 2))
    method = create("bct", ctx)
    out = method(batch([[2.0, 0.0], [9.0, -9.0], [0.0, 1.0]], [0, 1, 2]))
    # class 0 -> old index 0, logits (2, 0); class 2 -> old index 1, logits (0, 1); class 1 is not an old class
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert out.total.item() == pytest.approx(expected, rel=1e-6)


def two_class_stats():
    # class 0 centred on (1, 0) with samples at +-30 degrees; class 1 has a single sample (no radius); class 2 none
    emb = torch.tensor([unit(30), unit(-30), unit(90)])
    return compute_class_statistics(emb, torch.tensor([0, 0, 1]), 3, "m")


def test_statistics_angular_radius():
    stats = two_class_stats()
    assert stats.angular_radii[0].item() == pytest.approx(math.radians(30), rel=1e-5)


def test_lce_boundary_and_alignment():
    ctx = CompatContext(embedding_dim=2, num_classes=3, statistics=two_class_stats())
    method = create("lce", ctx)
    classifier = torch.tensor([unit(90), unit(0), unit(0)])  # row 0 is orthogonal to class 0's centre
    out = method(batch([unit(60), unit(10), unit(-120)], [0, 0, 1], classifier=classifier))
    # angles to class 0's centre: 60 and 10 degrees, radius 30 -> excess 30 degrees and 0; class 1 has no radius
    assert out.parts["boundary"].item() == pytest.approx(math.radians(30) / 2, rel=1e-5)
    assert out.parts["align"].item() == pytest.approx(1.0, abs=1e-6)  # 1 - cos(90 deg), class 0 only


def test_lce_alignment_weighs_classes_by_their_samples_in_the_batch():
    # class 0: samples at +-30 deg -> centre direction 0 deg, angular radius 30 deg;
    # class 1: samples at 60 and 120 deg -> centre direction 90 deg, angular radius 30 deg; class 2: never seen.
    emb = torch.tensor([unit(30), unit(-30), unit(60), unit(120)])
    ctx = CompatContext(
        embedding_dim=2, num_classes=3, statistics=compute_class_statistics(emb, torch.tensor([0, 0, 1, 1]), 3)
    )
    classifier = torch.tensor(
        [unit(90), unit(90), unit(0)]
    )  # class 0's row is orthogonal to its centre, class 1's on it
    out = create("lce", ctx)(batch([unit(0), unit(60), unit(90), unit(45)], [0, 0, 1, 2], classifier=classifier))
    # Per old-class sample: 1 - cos(90 deg) = 1, 1, and 1 - cos(0) = 0 for the class-1 sample; class 2 takes no part.
    # Frequency-weighted: (1 + 1 + 0) / 3 = 2/3 (a mean over the two old classes would give 1/2).
    assert out.parts["align"].item() == pytest.approx(2 / 3, rel=1e-6)
    # Angles to the centres: 0, 60 and 0 deg; radius 30 deg -> excesses 0, 30 deg, 0 over the same three samples.
    assert out.parts["boundary"].item() == pytest.approx(math.radians(30) / 3, rel=1e-5)


def test_unibct_arcface_on_old_centres():
    ctx = CompatContext(embedding_dim=2, num_classes=3, statistics=two_class_stats())
    method = create("unibct", ctx, scale=1.0, margin=0.3)
    out = method(batch([unit(60), unit(0)], [0, 2]))  # class 2 was never seen by the old model: left out
    # prototypes: class 0 at 0 deg, class 1 at 90 deg; the sample at 60 deg: target cos(60 deg + 0.3 rad)
    target, other = math.cos(math.radians(60) + 0.3), math.cos(math.radians(30))
    assert out.total.item() == pytest.approx(math.log(1 + math.exp(other - target)), rel=1e-5)


def test_hot_refresh_negatives_are_other_class_only():
    new = torch.tensor([unit(0), unit(20), unit(90)])
    old = torch.tensor([unit(10), unit(30), unit(80)])
    labels = torch.tensor([0, 0, 1])
    t = 0.5
    sim = lambda a, b: math.cos(math.radians(a - b)) / t  # noqa: E731
    n_deg, o_deg = [0, 20, 90], [10, 30, 80]
    # sample 0: positive o0; negatives o2, n2 (class 1). sample 1: positive o1; negatives o2, n2.
    # sample 2: positive o2; negatives o0, o1, n0, n1.
    terms = []
    for i, negatives in (
        (0, [o_deg[2], n_deg[2]]),
        (1, [o_deg[2], n_deg[2]]),
        (2, [o_deg[0], o_deg[1], n_deg[0], n_deg[1]]),
    ):
        pos = sim(n_deg[i], o_deg[i])
        denom = math.exp(pos) + sum(math.exp(sim(n_deg[i], d)) for d in negatives)
        terms.append(-(pos - math.log(denom)))
    assert hot_refresh_loss(new, old, labels, t).item() == pytest.approx(sum(terms) / 3, rel=1e-5)


def _anchor_zero_batch():
    """Anchor 0 (class 0): new and old embedding at 0 deg, so its positive similarity is 1. Samples 1-3 are of
    other classes: new at 60, 90, 180 deg (similarities 0.5, 0, -1), old at 90, 120, 180 deg (0, -0.5, -1)."""
    new = torch.tensor([unit(0), unit(60), unit(90), unit(180)])
    old = torch.tensor([unit(0), unit(90), unit(120), unit(180)])
    return new, old, torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize(
    ("top_k", "kept"),
    [
        # k = 1: the hardest old negative (0) and the hardest new one (0.5)
        (1, [0.0, 0.5]),
        # k = 2: the second hardest of each kind (old -0.5, new 0) enters the softmax as well
        (2, [0.0, -0.5, 0.5, 0.0]),
        # k = 3 and None: every negative
        (3, [0.0, -0.5, -1.0, 0.5, 0.0, -1.0]),
        (None, [0.0, -0.5, -1.0, 0.5, 0.0, -1.0]),
    ],
)
def test_hot_refresh_keeps_the_k_hardest_negatives_of_each_kind(top_k, kept):
    new, old, labels = _anchor_zero_batch()
    # temperature 1: loss = -1 + log(e^1 + sum of e^s over the kept negatives)
    expected = -1 + math.log(math.e + sum(math.exp(s) for s in kept))
    loss = hot_refresh_loss(new, old, labels, 1.0, top_k, anchors=torch.tensor([0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_hot_refresh_with_fewer_valid_negatives_than_k_leaves_the_rest_out():
    # Samples 1 and 2 share anchor 0's class, so only sample 3 (new and old at 180 deg, similarity -1) is a negative
    # of each kind; k = 2 of 4 columns must not let a same-class sample (similarities 0.5 and 0) fill the second slot.
    new, old, _ = _anchor_zero_batch()
    new.requires_grad_(True)
    loss = hot_refresh_loss(new, old, torch.tensor([0, 0, 0, 3]), 1.0, 2, anchors=torch.tensor([0]))
    assert loss.item() == pytest.approx(-1 + math.log(math.e + 2 * math.exp(-1)), rel=1e-6)
    loss.backward()
    assert torch.isfinite(new.grad).all()
    assert new.grad[1:3].abs().max().item() == 0.0  # same-class samples are not pushed


def test_hot_refresh_defaults_to_the_public_ten_negatives_and_validates_its_options():
    ctx = CompatContext(embedding_dim=2, num_classes=4)
    assert create("hot-refresh", ctx).top_k == 10
    assert create("hot-refresh", ctx, top_k_negatives=None).top_k is None
    for bad in (0, -3):
        with pytest.raises(CompatError, match="option top_k_negatives: Input should be greater than 0"):
            create("hot-refresh", ctx, top_k_negatives=bad)
    for bad in (2.5, True, "10"):
        with pytest.raises(CompatError, match="option top_k_negatives: Input should be a valid integer"):
            create("hot-refresh", ctx, top_k_negatives=bad)
    with pytest.raises(CompatError, match="option temperature: Input should be greater than 0"):
        create("hot-refresh", ctx, temperature=0.0)
    with pytest.raises(CompatError, match="method 'hot-refresh' has no option 'topk_neg'; its options: temperature"):
        create("hot-refresh", ctx, topk_neg=10)


def test_registry_lists_every_method_and_refuses_unmet_needs():
    assert set(list_methods()) >= {
        "advbct",
        "advbct-adv-only",
        "advbct-bound-only",
        "advbct-fixed-radius",
        "independent",
        "l2",
        "bct",
        "lce",
        "unibct",
        "hot-refresh",
    }
    bare = CompatContext(embedding_dim=2, num_classes=3)
    with pytest.raises(CompatError, match="old model's classifier"):
        create("bct", bare)
    with pytest.raises(CompatError, match="statistics"):
        create("lce", bare)


def test_registry_tells_each_methods_kind_and_needs():
    assert reference_method() == "independent"
    assert compared_methods() == ["l2", "bct", "lce", "unibct", "hot-refresh", "advbct", "advbct-tight"]
    assert methods_of_kind("ablation") == ["advbct-adv-only", "advbct-bound-only", "advbct-fixed-radius"]
    assert methods_of_kind("variant") == ["advbct-tight"]
    assert not method_info("independent").needs_old_model
    # L2 and Hot-refresh read old embeddings; BCT the old classifier; AdvBCT and LCE the old statistics.
    assert all(method_info(m).needs_old_model for m in compared_methods())
    with pytest.raises(CompatError, match="kind must be one of reference, proposed, baseline, ablation, variant"):
        register_method("mystery", kind="novel")
    with pytest.raises(CompatError, match="there is already a reference method, 'independent'"):
        register_method("second-reference", kind="reference")(CompatibilityMethod)
    assert "second-reference" not in list_methods()


def test_ablations_switch_parts_off():
    ctx = CompatContext(embedding_dim=2, num_classes=3, statistics=two_class_stats())
    b = batch([unit(60), unit(10)], [0, 0], old=[unit(5), unit(15)])
    assert set(create("advbct-adv-only", ctx)(b).parts) == {"adv", "disc_acc"}
    assert set(create("advbct-bound-only", ctx)(b).parts) == {"bound", "violating", "radius"}
    # Without the adversarial term nothing reads old embeddings, so training skips the old model's forward pass.
    assert not create("advbct-bound-only", ctx).needs_old_embeddings
    assert not create("advbct", ctx, adversarial=False).needs_old_embeddings
    assert create("advbct", ctx).needs_old_embeddings and create("advbct-adv-only", ctx).needs_old_embeddings
    no_old = batch([unit(60), unit(10)], [0, 0], old=None)
    assert set(create("advbct-bound-only", ctx)(no_old).parts) == {"bound", "violating", "radius"}
    # An ablation's switched-off part is not one of its options.
    with pytest.raises(CompatError, match="method 'advbct-bound-only' has no option 'adversarial'"):
        create("advbct-bound-only", ctx, adversarial=True)


def _four_sample_class_statistics():
    """Class 0 at +-30 and +-60 deg: centre ((cos 30 + cos 60) / 2, 0) = ((sqrt 3 + 1) / 4, 0). The +-30 deg samples
    lie sqrt(8 - 2 sqrt 3) / 4 = 0.5325 from it, the +-60 deg ones sqrt(16 - 2 sqrt 3) / 4 = 0.8851; quartiles
    0.5325 and 0.8851, so nothing is an outlier. Class 1 has one sample (no radius)."""
    emb = torch.tensor([unit(30), unit(-30), unit(60), unit(-60), unit(90)])
    return compute_class_statistics(emb, torch.tensor([0, 0, 0, 0, 1]), 2, "m")


NEAR = math.sqrt(8 - 2 * math.sqrt(3)) / 4
FAR = math.sqrt(16 - 2 * math.sqrt(3)) / 4


def test_statistics_store_the_smallest_median_and_largest_inlier_distance():
    stats = _four_sample_class_statistics()
    assert stats.min_radii[0].item() == pytest.approx(NEAR, rel=1e-6)
    assert stats.median_radii[0].item() == pytest.approx((NEAR + FAR) / 2, rel=1e-6)
    assert stats.radii[0].item() == pytest.approx(FAR, rel=1e-6)


@pytest.mark.parametrize(("radius", "expected"), [("min", NEAR), ("median", (NEAR + FAR) / 2), ("max", FAR)])
def test_fixed_radius_ablation_uses_the_chosen_radius(radius, expected):
    ctx = CompatContext(embedding_dim=2, num_classes=2, statistics=_four_sample_class_statistics())
    method = create("advbct-fixed-radius", ctx, radius=radius, adversarial=False)
    assert method.radii()[0].item() == pytest.approx(expected, rel=1e-6)
    # Class-0 samples at 0 deg, 1 - (sqrt 3 + 1) / 4 = 0.3170 from the centre (inside every radius), and at 90 deg,
    # sqrt(c^2 + 1) = sqrt(20 + 2 sqrt 3) / 4 = 1.2110 away: the one violator, so the boundary term is that distance
    # less the radius.
    out = method(batch([unit(0), unit(90)], [0, 0]))
    assert out.parts["bound"].item() == pytest.approx(math.sqrt(20 + 2 * math.sqrt(3)) / 4 - expected, rel=1e-5)
    assert out.parts["violating"].item() == 0.5


def test_fixed_radius_defaults_to_the_public_codes_smallest_inlier_distance_and_validates_the_choice():
    ctx = CompatContext(embedding_dim=2, num_classes=2, statistics=_four_sample_class_statistics())
    assert create("advbct-fixed-radius", ctx).radii()[0].item() == pytest.approx(NEAR, rel=1e-6)
    with pytest.raises(CompatError, match="option radius: Input should be 'min', 'median' or 'max', got 'mean'"):
        create("advbct-fixed-radius", ctx, radius="mean")
    with pytest.raises(CompatError, match="method 'advbct-fixed-radius' has no option 'elastic'"):
        create("advbct-fixed-radius", ctx, elastic=True)


PARTS = [{"adversarial": False}, {"boundary": False}, {"elastic": True}, {"discriminator": "class-conditional"}]


@pytest.mark.parametrize(
    ("name", "options"),
    [*((m, {}) for m in list_methods() if m != reference_method()), *(("advbct-tight", o) for o in PARTS)],
)
def test_every_parameter_of_a_method_receives_a_gradient(name, options):
    # DistributedDataParallel stops a run whose loss holds a parameter no term uses: an ablation or variant with a
    # part switched off must not keep that part's weights.
    method = create(name, make_context(8, 6), **options)
    labels = torch.arange(12) % 6
    new_emb, classifier = torch.randn(12, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    method(CompatBatch(new_emb, labels, torch.randn(12, 8), 0.3, 1, 3, classifier)).total.backward()
    assert [key for key, p in method.named_parameters() if p.requires_grad and p.grad is None] == []

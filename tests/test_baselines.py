"""Baseline compatibility losses on tiny 2-D tensors with values worked out by hand."""

import math

import pytest
import torch

from advbct.compat import CompatBatch, CompatContext, CompatError, compute_class_statistics, create, list_methods
from advbct.compat.baselines import hot_refresh_loss, l2_regression_loss
from advbct.models.heads import SoftmaxHead


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def batch(new, labels, old=None, classifier=None):
    return CompatBatch(
        torch.tensor(new), torch.tensor(labels), None if old is None else torch.tensor(old), 0.5, 0, 2, classifier
    )


def test_l2_regression():
    assert l2_regression_loss(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 4.0]])) == 15.0


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
    fixed = create("advbct-fixed-radius", ctx)
    assert torch.equal(fixed.radii(), fixed.r_max)

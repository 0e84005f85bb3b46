"""AdvBCT's parts with hand-computed values: elastic radius, boundary loss, gradient reversal, schedules; and the
``advbct-tight`` variant's options (warm-up schedule, elastic step from a tight radius, class-conditional D)."""

import math

import pytest
import torch

from advbct.compat import (
    ClassStatistics,
    CompatBatch,
    CompatContext,
    CompatError,
    compute_class_statistics,
    create,
    list_methods,
)
from advbct.compat.advbct import (
    adversarial_loss,
    adversarial_weight,
    boundary_loss,
    dann_alpha,
    elastic_radii,
    grad_reverse,
    mean_radius,
    warmup_adversarial_weight,
)
from advbct.presets import train_config


def test_elastic_radius_on_both_sides_of_tau():
    r_max = torch.tensor([0.5, 1.4, 0.5, 1.4, 1.0])
    w = torch.tensor([0.0, 0.0, 50.0, 50.0, 3.0])
    r = elastic_radii(r_max, w, tau=1.0)
    # below tau: 0.5 + |0.5-1| * 0.5 = 0.75; above: 1.4 - 0.4 * 0.5 = 1.2; w -> inf moves r to tau; r_max = tau stays
    assert r.tolist() == pytest.approx([0.75, 1.2, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("tau", [1.0, 0.5, 0.7])
def test_elastic_radius_equals_the_two_case_form_of_the_method_bit_for_bit(tau):
    # The paper: r_e = |r_max - tau| sigmoid(w); r = r_max + r_e where r_max < tau, else r_max - r_e.
    torch.manual_seed(0)
    r_max = torch.cat([torch.rand(1000) * 2, torch.tensor([tau, 0.0, 2.0])])
    w_new = (torch.randn(r_max.numel()) * 4).requires_grad_()
    w_ref = w_new.detach().clone().requires_grad_()
    r_e = (r_max - tau).abs() * torch.sigmoid(w_ref)
    reference = torch.where(r_max < tau, r_max + r_e, r_max - r_e)
    radii = elastic_radii(r_max, w_new, tau)
    assert torch.equal(radii, reference)
    upstream = torch.randn(r_max.numel())
    (radii * upstream).sum().backward()
    (reference * upstream).sum().backward()
    assert torch.equal(w_new.grad, w_ref.grad)


def test_elastic_radius_stays_between_r_max_and_tau():
    r_max = torch.rand(100) * 2
    r = elastic_radii(r_max, torch.randn(100) * 5, tau=1.0)
    lo, hi = torch.minimum(r_max, torch.ones(100)), torch.maximum(r_max, torch.ones(100))
    assert torch.all((r >= lo - 1e-6) & (r <= hi + 1e-6))


def test_mean_radius_leaves_out_classes_without_radius():
    radii = torch.tensor([0.75, 1.2, 9.0])
    has_radius = torch.tensor([True, True, False])
    assert mean_radius(radii, has_radius).item() == pytest.approx((0.75 + 1.2) / 2)
    assert mean_radius(radii, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_boundary_loss_counts_only_violating_samples_of_classes_with_radius():
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    radii = torch.tensor([0.5, 0.1])
    has_radius = torch.tensor([True, False])
    emb = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-4.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1])
    loss, fraction = boundary_loss(emb, labels, centres, radii, has_radius)
    # sample 0 sits on the centre (no violation); sample 1 at distance sqrt(2); sample 2 at sqrt(2 - sqrt(2));
    # sample 3 is far from its centre but class 1 has no radius, so it does not count.
    expected = ((math.sqrt(2) - 0.5) + (math.sqrt(2 - math.sqrt(2)) - 0.5)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert fraction.item() == pytest.approx(0.5)


def test_boundary_loss_is_zero_without_violations():
    loss, fraction = boundary_loss(
        torch.tensor([[1.0, 0.01]]),
        torch.tensor([0]),
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([0.5]),
        torch.tensor([True]),
    )
    assert loss.item() == 0.0 and fraction.item() == 0.0


def test_gradient_reversal_flips_and_scales():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == pytest.approx([-0.3, -0.6, -0.9])


def test_schedules_endpoints():
    assert dann_alpha(0.0) == 0.0
    assert dann_alpha(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert dann_alpha(1.0) == pytest.approx(0.9999092, abs=1e-7)
    assert adversarial_weight(0, 30) == pytest.approx(31 / 30)
    assert adversarial_weight(29, 30) == pytest.approx(2 / 30)


def _context(dim=4, classes=3):
    stats = compute_class_statistics(torch.randn(30, dim), torch.arange(30) % classes, classes, "m")
    return CompatContext(embedding_dim=dim, num_classes=classes, statistics=stats)


def test_advbct_total_is_boundary_plus_weighted_adversarial_and_backbone_gets_reversed_gradient():
    torch.manual_seed(0)
    method = create("advbct", _context())
    new = torch.randn(8, 4, requires_grad=True)
    old = torch.randn(8, 4)
    labels = torch.arange(8) % 3
    out = method(CompatBatch(new, labels, old, progress=0.5, epoch=1, num_epochs=4))
    w = adversarial_weight(1, 4)
    assert out.total.item() == pytest.approx(out.parts["bound"].item() + w * out.parts["adv"].item(), rel=1e-6)
    # With the boundary term off, the embedding gradient is the discriminator's gradient reversed and scaled.
    adv_only = create("advbct", _context(), boundary=False)
    adv_only.discriminator.load_state_dict(method.discriminator.state_dict())
    new.grad = None
    adv_only(CompatBatch(new, labels, old, 0.5, 1, 4)).total.backward()
    reversed_grad = new.grad.clone()
    new2 = new.detach().clone().requires_grad_(True)
    logits = torch.cat([adv_only.discriminator(new2), adv_only.discriminator(old)])  # the paper: D on each side
    target = torch.cat([torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long)])
    (
        w
        * (
            torch.nn.functional.cross_entropy(logits[:8], target[:8])
            + torch.nn.functional.cross_entropy(logits[8:], target[8:])
        )
    ).backward()
    assert torch.allclose(reversed_grad, -dann_alpha(0.5) * new2.grad, atol=1e-6)


def test_registry_and_requirements():
    assert {"advbct", "independent"} <= set(list_methods())
    with pytest.raises(CompatError, match="unknown compatibility method 'nope'"):
        create("nope", _context())
    with pytest.raises(CompatError, match="statistics"):
        create("advbct", CompatContext(embedding_dim=4, num_classes=3))
    with pytest.raises(CompatError, match="method 'advbct' has no option 'taux'; its options: tau, "):
        create("advbct", _context(), taux=2.0)


def _softplus(z):
    return math.log1p(math.exp(z))


def _batch_norm_discriminator():
    """BatchNorm1d(1, affine=False) -> logits (0, x): D's call on a batch sees that batch standardised."""
    return torch.nn.Sequential(torch.nn.BatchNorm1d(1, affine=False, eps=1e-12), torch.nn.Linear(1, 2, bias=False))


def test_separate_calls_of_the_discriminator_hide_a_shift_between_old_and_new():
    old = torch.tensor([[1.0], [3.0]])
    new = torch.tensor([[-3.0], [-1.0]])
    d = _batch_norm_discriminator()
    d[1].weight.data = torch.tensor([[0.0], [1.0]])
    # Each call standardises its pair to (-1, 1): D sees the same two inputs on both sides, whatever the shift, so
    # it scores softplus(-1) + softplus(1) (one of each pair right) although one joint batch would separate them.
    loss, accuracy = adversarial_loss(d, new, old, 1.0)
    assert loss.item() == pytest.approx(_softplus(-1) + _softplus(1), rel=1e-5)
    assert accuracy.item() == 0.5
    shifted, _ = adversarial_loss(d, new + 100.0, old, 1.0)
    assert shifted.item() == pytest.approx(loss.item(), rel=1e-6)


def test_adversarial_loss_reverses_the_new_embeddings_gradient():
    d = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    new, old = torch.randn(6, 2, requires_grad=True), torch.randn(6, 2)
    adversarial_loss(d, new, old, 0.25)[0].backward()
    reversed_grad = new.grad.clone()
    new.grad = None
    d.zero_grad()
    # The same loss with no reversal: D's own gradient with respect to its new-side inputs.
    logits = torch.cat([d(new), d(old)])
    targets = torch.cat([torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)])
    (
        torch.nn.functional.cross_entropy(logits[:6], targets[:6])
        + torch.nn.functional.cross_entropy(logits[6:], targets[6:])
    ).backward()
    assert torch.allclose(reversed_grad, -0.25 * new.grad, atol=1e-7)


def test_warmup_weight_grows_to_one_in_the_last_epoch():
    assert [warmup_adversarial_weight(e, 4) for e in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # The CUDA-graph path hands the epoch as a 0-d tensor and gets a tensor back.
    assert warmup_adversarial_weight(torch.tensor(2), 4).item() == 0.75


def _hand_stats(min_radii, has_radius, dim=2):
    """Statistics with hand-set tight radii; the other radii are far larger, so a test sees which one is used."""
    classes = len(min_radii)
    return ClassStatistics(
        centres=torch.eye(classes, dim),
        radii=torch.full((classes,), 9.0),
        min_radii=torch.tensor(min_radii),
        median_radii=torch.full((classes,), 7.0),
        angular_radii=torch.ones(classes),
        counts=torch.full((classes,), 5),
        has_radius=torch.tensor(has_radius),
        old_model_id="m",
        class_names=tuple(str(c) for c in range(classes)),
    )


def test_tight_elastic_radius_moves_toward_the_mean_tight_radius():
    stats = _hand_stats([0.2, 0.6, 5.0], [True, True, False])
    ctx = CompatContext(embedding_dim=2, num_classes=3, statistics=stats)
    method = create("advbct-tight", ctx, elastic=True, tau="stats")
    # tau = mean of r_min over the classes with a radius = (0.2 + 0.6) / 2 = 0.4 (class 2 has none).
    assert method.tau == pytest.approx(0.4)
    with torch.no_grad():
        method.radius_weights.zero_()
    # sigmoid(0) = 1/2: halfway from r_min to 0.4: 0.3, 0.5, and 5.0 + (0.4 - 5.0) / 2 = 2.7.
    assert method.radii().tolist() == pytest.approx([0.3, 0.5, 2.7])
    bound_only = create("advbct-tight", ctx, elastic=True, tau="stats", adversarial=False)
    bound_only.load_state_dict(method.state_dict(), strict=False)
    out = bound_only(CompatBatch(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), None, 0.5, 0, 2))
    assert out.parts["radius"].item() == pytest.approx((0.3 + 0.5) / 2)
    # Without the elastic step the radius is r_min itself.
    assert create("advbct-tight", ctx, tau="stats").radii().tolist() == pytest.approx([0.2, 0.6, 5.0])


def test_class_conditional_discriminator_adds_the_class_term_to_the_old_logit():
    # dim 1, one hidden unit: Linear(x) = x, batch norm maps each side's pair (-1, 1) to (-1, 1) (up to its eps),
    # ReLU to (0, 1). The marginal head says 0 for both logits; V = (2, -1) adds 2 <V[y], h> only where h = 1.
    ctx = CompatContext(embedding_dim=1, num_classes=2, statistics=_hand_stats([0.5, 0.5], [True, True], dim=1))
    method = create(
        "advbct-tight", ctx, boundary=False, discriminator="class-conditional", adversarial_schedule="warmup",
        discriminator_hidden=1,
    )  # fmt: skip
    disc = method.discriminator
    with torch.no_grad():
        disc.features[0].weight.fill_(1.0)
        disc.features[0].bias.zero_()
        disc.head.weight.zero_()
        disc.head.bias.zero_()
        disc.class_vectors.copy_(torch.tensor([[2.0], [-1.0]]))
    emb = torch.tensor([[-1.0], [1.0]])
    out = method(CompatBatch(emb, torch.tensor([1, 0]), emb.clone(), progress=0.5, epoch=1, num_epochs=4))
    # Row 0 (h = 0): logits (0, 0), CE ln 2 on either side. Row 1 (h = 1, class 0): logits (0, 2), CE
    # softplus(2) = 2.126928 as new (label 0), softplus(-2) = 0.126928 as old (label 1).
    # Loss: (ln 2 + 2.126928) / 2 + (ln 2 + 0.126928) / 2 = 0.693147 + 1.126928 = 1.820075.
    assert out.parts["adv"].item() == pytest.approx(1.820075, rel=1e-4)
    # D calls row 0 new (a tie goes to index 0) and row 1 old: right on one row of each side.
    assert out.parts["disc_acc"].item() == 0.5
    # warm-up weight at epoch 1 of 4: 0.5.
    assert out.total.item() == pytest.approx(0.5 * 1.820075, rel=1e-4)
    # With class 1's vector on row 1 instead, the term is -1: logits (0, -1), so the loss is
    # ln 2 + (softplus(-1) + softplus(1)) / 2 = 0.693147 + (0.313262 + 1.313262) / 2 = 1.506409.
    other = method(CompatBatch(emb, torch.tensor([0, 1]), emb.clone(), progress=0.5, epoch=1, num_epochs=4))
    assert other.parts["adv"].item() == pytest.approx(1.506409, rel=1e-4)


def test_class_conditional_discriminator_covers_classes_new_to_the_new_model():
    # Extended-class: statistics cover the new model's 5 classes, the last two without a radius (no old samples).
    stats = _hand_stats([0.3, 0.4, 0.5, 0.0, 0.0], [True, True, True, False, False], dim=4)
    method = create("advbct-tight", CompatContext(4, 5, stats), discriminator="class-conditional")
    assert method.discriminator.class_vectors.shape == (5, method.discriminator.head.in_features)
    new = torch.randn(6, 4, requires_grad=True)
    out = method(CompatBatch(new, torch.tensor([0, 1, 2, 3, 4, 4]), torch.randn(6, 4), 0.5, 0, 2))
    out.total.backward()
    assert torch.isfinite(out.total) and new.grad is not None


def test_default_tight_variant_is_the_fixed_radius_ablation_with_a_normalised_discriminator_input():
    ctx = _context(dim=4, classes=3)
    torch.manual_seed(3)
    tight = create("advbct-tight", ctx)
    torch.manual_seed(3)
    fixed = create("advbct-fixed-radius", ctx, normalise_discriminator_input=True)
    new, old, labels = torch.randn(9, 4), torch.randn(9, 4), torch.arange(9) % 3
    grads = []
    outputs = []
    for method in (tight, fixed):
        emb = new.clone().requires_grad_()
        out = method(CompatBatch(emb, labels, old, progress=0.3, epoch=1, num_epochs=3))
        out.total.backward()
        outputs.append(out)
        grads.append(emb.grad)
    assert torch.equal(outputs[0].total, outputs[1].total)
    assert outputs[0].parts.keys() == outputs[1].parts.keys()
    assert torch.equal(grads[0], grads[1])


def test_tight_variant_options_are_checked_and_reach_it_from_overrides():
    with pytest.raises(CompatError, match=r"option tau: Input should be a valid number.* or Input should be 'stats'"):
        create("advbct-tight", _context(), tau="loose")
    with pytest.raises(CompatError, match="option adversarial_schedule"):
        create("advbct-tight", _context(), adversarial_schedule="cosine")
    overrides = [
        "compat.method=advbct-tight",
        "compat.options.tau=stats",
        "compat.options.adversarial_schedule=warmup",
        "compat.options.discriminator=class-conditional",
        "compat.options.elastic=true",
        "compat.options.radius=median",
    ]
    cfg = train_config("new", "smoke", None, overrides, None, "cpu")
    assert cfg.compat.options == {
        "tau": "stats",
        "adversarial_schedule": "warmup",
        "discriminator": "class-conditional",
        "elastic": True,
        "radius": "median",
    }

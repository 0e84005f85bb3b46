"""AdvBCT (CVPR 2023): elastic boundary constraint + adversarial alignment through gradient reversal.

L = L_cls + L_bound + w_e * L_adv, with
- L_bound: mean over the samples that cross their old class boundary of (||normalize(f_new) - c_y|| - r(y)),
  where r(y) moves between r_max(y) and tau through a learnable weight per class;
- L_adv = CE(D(GRL(f_new)), 0) + CE(D(f_old), 1): a discriminator tells old embeddings (label 1) from new ones
  (label 0), applied to each side in its own call as the formula writes it; new embeddings reach it through a
  gradient-reversal layer whose coefficient follows the DANN schedule, so the backbone learns to fool it;
- w_e = (E - e + 1) / E for epoch e in 0..E-1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Annotated, ClassVar, Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import nn

from advbct.compat.base import (
    CompatBatch,
    CompatContext,
    CompatError,
    CompatibilityMethod,
    LossOutput,
    NoOptions,
    options_schema,
    register_method,
)

PAPER_TAU = 1.0  # the elastic boundary's threshold in the paper's configuration


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, coeff: float | torch.Tensor) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float | torch.Tensor) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by ``-coeff`` on the way back. ``coeff`` may be a 0-d tensor on
    the device, so a step captured in a CUDA graph follows a schedule that changes between replays."""
    return _GradReverse.apply(x, coeff)


def dann_alpha(progress: float | torch.Tensor) -> float | torch.Tensor:
    """alpha(p) = 2 / (1 + exp(-10 p)) - 1: 0 at the start, approaching 1 at the end of training. A tensor
    progress gives a tensor alpha computed on its device (the CUDA-graph training path)."""
    exp = torch.exp if isinstance(progress, torch.Tensor) else math.exp
    return 2.0 / (1.0 + exp(-10.0 * progress)) - 1.0


def adversarial_weight(epoch: int | torch.Tensor, num_epochs: int) -> float | torch.Tensor:
    """w_e = (E - e + 1) / E, decaying with the epoch index e = 0..E-1. A 0-d tensor epoch (the CUDA-graph
    training path) gives a tensor weight, so one captured step serves every epoch."""
    return (num_epochs - epoch + 1) / num_epochs


def warmup_adversarial_weight(epoch: int | torch.Tensor, num_epochs: int) -> float | torch.Tensor:
    """w_e = (e + 1) / E, growing with the epoch index e = 0..E-1 to 1 in the last epoch: the alignment pulls
    hardest once the new model's classes have formed, not in epoch 0 while its embedding is still random. A 0-d
    tensor epoch gives a tensor weight, as :func:`adversarial_weight`'s does."""
    return (epoch + 1) / num_epochs


def elastic_radii(r_max: torch.Tensor, weights: torch.Tensor, tau: float) -> torch.Tensor:
    """r = r_max + |r_max - tau| sigmoid(w) below tau, r_max - |r_max - tau| sigmoid(w) above: always between.

    Both cases are r_max + (tau - r_max) sigmoid(w), a step from r_max toward tau, which is how it is computed:
    half the operations of the two-case form on every training step, with the same floating-point result
    (negating a difference is exact).
    """
    return r_max + (tau - r_max) * torch.sigmoid(weights)


def boundary_loss(
    new_emb: torch.Tensor,
    labels: torch.Tensor,
    centres: torch.Tensor,
    radii: torch.Tensor,
    has_radius: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean excess distance over violating samples of classes with a radius; also the violator fraction."""
    dist = (F.normalize(new_emb.float(), dim=1) - centres[labels]).norm(dim=1)
    excess = (dist - radii[labels]).clamp(min=0)
    violating = has_radius[labels] & (excess > 0)
    count = violating.sum()
    loss = torch.where(violating, excess, torch.zeros_like(excess)).sum() / count.clamp(min=1)
    return loss, count.float() / max(1, labels.numel())


def mean_radius(radii: torch.Tensor, has_radius: torch.Tensor) -> torch.Tensor:
    """Mean boundary radius over the classes that have one: logged so a run shows where the elastic radius moves
    between r_max and tau as its weights learn. Computed without boolean indexing, so no host sync on CUDA."""
    usable = has_radius.to(radii.dtype)
    return (radii * usable).sum() / usable.sum().clamp(min=1)


class Discriminator(nn.Sequential):
    """Linear(d, 100) - BatchNorm1d - ReLU - Linear(100, 2): old (1) versus new (0) embeddings."""

    def __init__(self, dim: int, hidden: int = 100):
        super().__init__(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2))


def adversarial_loss(
    discriminator: Callable[[torch.Tensor], torch.Tensor],
    new_emb: torch.Tensor,
    old_emb: torch.Tensor,
    alpha: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CE(D(GRL(new)), 0) + CE(D(old), 1) with old and new in two calls of D, as the paper writes the loss and as
    its public code does.

    D's BatchNorm then standardises each domain by its own batch statistics, so D cannot win on per-dimension
    means and scales alone; it must find differences in how the dimensions vary together, and the reversed
    gradient pushes that joint structure towards the old one. One joint call would let D separate the domains by
    their means alone, win at once, and leave a reversed gradient that fades.
    """
    logits = torch.cat([discriminator(grad_reverse(new_emb.float(), alpha)), discriminator(old_emb.float().detach())])
    return _discriminator_loss(logits, new_emb.shape[0])


def _discriminator_loss(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CE(first n rows, new = 0) + CE(the rest, old = 1), and D's accuracy over all rows."""
    targets = torch.cat([logits.new_zeros(n, dtype=torch.long), logits.new_ones(logits.shape[0] - n, dtype=torch.long)])
    loss = F.cross_entropy(logits[:n], targets[:n]) + F.cross_entropy(logits[n:], targets[n:])
    return loss, (logits.argmax(1) == targets).float().mean()


@options_schema
class AdvBCTOptions:
    """AdvBCT's options: the elastic boundary's threshold ``tau``, the discriminator's width, which parts run
    (``boundary``, ``adversarial``, ``elastic`` radii), whether D sees L2-normalised embeddings, and a scale on the
    adversarial term's weight."""

    tau: float = PAPER_TAU
    discriminator_hidden: Annotated[int, pydantic.Field(ge=1)] = 100
    boundary: bool = True
    adversarial: bool = True
    elastic: bool = True
    normalise_discriminator_input: bool = False
    adversarial_scale: Annotated[float, pydantic.Field(ge=0.0)] = 1.0


@register_method("advbct", kind="proposed")
class AdvBCT(CompatibilityMethod):
    Options = AdvBCTOptions
    requires = ("statistics",)
    batch_wide = True  # the discriminator's batch norm and the mean over boundary violators span the batch

    def __init__(self, context: CompatContext, options: AdvBCTOptions):
        super().__init__()
        stats = context.statistics
        assert stats is not None  # guaranteed by `requires`, checked in create()
        if stats.dim != context.embedding_dim:
            raise CompatError(f"statistics have dim {stats.dim}, the new model embeds to {context.embedding_dim}")
        if stats.num_classes != context.num_classes:
            raise CompatError(f"statistics cover {stats.num_classes} classes, training has {context.num_classes}")
        self.tau, self.use_boundary, self.elastic = options.tau, options.boundary, options.elastic
        self.use_adversarial = options.adversarial
        self.needs_old_embeddings = options.adversarial  # only the discriminator reads old embeddings
        self.normalise_discriminator_input = options.normalise_discriminator_input
        self.adversarial_scale = options.adversarial_scale
        self.register_buffer("centres", stats.centres.clone())
        self.register_buffer("r_max", stats.radii.clone())
        self.register_buffer("has_radius", stats.has_radius.clone())
        # Both are drawn whichever parts run, so an ablation starts from the same weights as the whole method; each
        # is registered only where a loss uses it: a parameter without gradients stops DistributedDataParallel.
        weights = torch.empty(stats.num_classes).uniform_(-1.0, 1.0)
        discriminator = Discriminator(context.embedding_dim, options.discriminator_hidden)
        if self.use_boundary and self.elastic:
            self.radius_weights = nn.Parameter(weights)
        if self.use_adversarial:
            self.discriminator = discriminator

    def radii(self) -> torch.Tensor:
        return elastic_radii(self.r_max, self.radius_weights, self.tau) if self.elastic else self.r_max

    def discriminator_for(self, batch: CompatBatch) -> Callable[[torch.Tensor], torch.Tensor]:
        """D as the adversarial loss calls it on each side of ``batch``: the paper's D reads the embeddings alone."""
        return self.discriminator

    def epoch_weight(self, batch: CompatBatch) -> float | torch.Tensor:
        """The adversarial term's schedule over epochs: the paper's decaying w_e."""
        return adversarial_weight(batch.epoch, batch.num_epochs)

    def forward(self, batch: CompatBatch) -> LossOutput:
        zero = batch.new_emb.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        total = zero
        if self.use_boundary:
            radii = self.radii()
            bound, violating = boundary_loss(batch.new_emb, batch.labels, self.centres, radii, self.has_radius)
            parts["bound"], parts["violating"] = bound, violating.detach()
            parts["radius"] = mean_radius(radii.detach(), self.has_radius)
            total = total + bound
        if self.use_adversarial:
            if batch.old_emb is None:
                raise ValueError("AdvBCT's adversarial term needs old embeddings of the batch")
            new_emb, old_emb = batch.new_emb, batch.old_emb
            if self.normalise_discriminator_input:
                new_emb, old_emb = F.normalize(new_emb.float(), dim=1), F.normalize(old_emb.float(), dim=1)
            adv, disc_acc = adversarial_loss(
                self.discriminator_for(batch), new_emb, old_emb, dann_alpha(batch.progress)
            )
            weight = self.adversarial_scale * self.epoch_weight(batch)
            parts["adv"], parts["disc_acc"] = adv, disc_acc.detach()
            total = total + weight * adv
        return LossOutput(total, parts)


@register_method("independent", kind="reference")
class Independent(CompatibilityMethod):
    """phi_*: classification only, no compatibility term (the discrimination upper bound)."""

    needs_old_embeddings = False

    def __init__(self, context: CompatContext, options: NoOptions):
        super().__init__()

    def forward(self, batch: CompatBatch) -> LossOutput:
        return LossOutput(batch.new_emb.new_zeros((), dtype=torch.float32))


def _ablation(name: str, doc: str, **fixed: bool) -> type[AdvBCT]:
    """AdvBCT with some parts switched off, registered under its own name for comparisons."""

    class Ablation(AdvBCT):
        fixed_options = fixed

    Ablation.__name__ = Ablation.__qualname__ = "AdvBCT_" + name.replace("-", "_")
    Ablation.__doc__ = doc
    return register_method(name, kind="ablation")(Ablation)


_ablation("advbct-adv-only", "AdvBCT without the boundary term (adversarial alignment only).", boundary=False)
_ablation("advbct-bound-only", "AdvBCT without the adversarial term (elastic boundary only).", adversarial=False)


@options_schema
class FixedRadiusOptions(AdvBCTOptions):
    """AdvBCT's options plus which fixed radius each old class gets."""

    radius: Literal["min", "median", "max"] = "min"


@register_method("advbct-fixed-radius", kind="ablation")
class AdvBCTFixedRadius(AdvBCT):
    """AdvBCT with a fixed boundary radius per old class instead of the elastic one.

    ``radius`` picks it among the class's IQR inlier distances: ``min`` (the default) is what the public AdvBCT
    code's non-elastic path uses, a tight ball; ``median`` and ``max`` (r_max, the elastic radius's starting point)
    show how much of the elastic boundary's effect a looser fixed ball already gives.
    """

    Options = FixedRadiusOptions
    fixed_options: ClassVar[Mapping[str, bool]] = {"elastic": False}

    def __init__(self, context: CompatContext, options: FixedRadiusOptions):
        super().__init__(context, options)
        stats = context.statistics
        assert stats is not None  # guaranteed by `requires`
        chosen = {"min": stats.min_radii, "median": stats.median_radii, "max": stats.radii}[options.radius]
        self.radius_choice = options.radius
        self.register_buffer("fixed_radii", chosen.clone())

    def radii(self) -> torch.Tensor:
        return self.fixed_radii


class ClassConditionalDiscriminator(nn.Module):
    """A projection discriminator (Miyato & Koyama, 2018) on (embedding, class) pairs: the marginal D's logits, with
    <V[y], h> added to the "old" logit, where h is D's hidden layer and V holds one learned vector per class.

    The logit difference old - new is then psi(h) + <V[y], h>: D can tell old from new within a class even when the
    two marginal distributions match, so the reversed gradient aligns each class with its old counterpart. V starts
    at zero, so D starts as the marginal one it wraps; its rows cover every class the new model trains on (global
    ids), new classes included.
    """

    def __init__(self, marginal: Discriminator, num_classes: int):
        super().__init__()
        *features, self.head = marginal
        self.features = nn.Sequential(*features)
        hidden = self.head.in_features
        self.class_vectors = nn.Parameter(torch.zeros(num_classes, hidden))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.features(emb)
        projection = (self.class_vectors[labels] * hidden).sum(1, keepdim=True)
        return self.head(hidden) + torch.cat([torch.zeros_like(projection), projection], dim=1)


_ADVERSARIAL_SCHEDULES = {"decay": adversarial_weight, "warmup": warmup_adversarial_weight}


@options_schema
class TightOptions(FixedRadiusOptions):
    """The fixed-radius ablation's options (``radius``: which inlier distance bounds each old class; min is
    tightest), with the elastic step, ``tau``, the adversarial schedule and the discriminator as choices.

    - ``elastic``: move each class's radius from the tight one toward ``tau`` through a learned per-class weight,
      so training can loosen a ball that is too tight for the new model (AdvBCT's elastic step, started from the
      tight radius instead of r_max).
    - ``tau``: the elastic step's threshold, a number or ``"stats"``: the mean chosen radius over the old classes
      that have one, a threshold on the scale of this old model's balls (the paper's 1.0 lies above nearly every
      class's radius of a small model, so the step could only loosen). It matters only with ``elastic``.
    - ``adversarial_schedule``: ``decay`` is the paper's w_e = (E - e + 1) / E; ``warmup`` is (e + 1) / E, so the
      alignment is strongest once the new classes have formed rather than on a random embedding.
    - ``discriminator``: ``marginal`` is the paper's D on embeddings; ``class-conditional`` tells old from new on
      (embedding, class) pairs (:class:`ClassConditionalDiscriminator`), so alignment is per class.
    - ``normalise_discriminator_input`` is on: D compares directions, which is all that cosine retrieval reads.

    The defaults are the candidate chosen on the validation split (docs/results.md, "An AdvBCT variant").
    """

    elastic: bool = False
    tau: float | Literal["stats"] = PAPER_TAU
    adversarial_schedule: Literal["decay", "warmup"] = "decay"
    discriminator: Literal["marginal", "class-conditional"] = "marginal"
    normalise_discriminator_input: bool = True


@register_method("advbct-tight", kind="variant")
class AdvBCTTight(AdvBCTFixedRadius):
    """AdvBCT with a tight boundary (a fixed inlier radius per old class, optionally elastic toward a threshold
    taken from the old statistics), a choice of adversarial schedule, and an optional class-conditional
    discriminator: the candidate changes for small budgets and models trained from scratch, where r_max balls
    overlap most other classes and a marginal discriminator sits at chance. With its defaults it is the
    fixed-radius ablation at ``radius=min`` with the discriminator reading L2-normalised embeddings: the tight ball
    keeps each new embedding near its old class centre, and the alignment acts on directions only.
    """

    Options = TightOptions
    fixed_options: ClassVar[Mapping[str, bool]] = {}

    def __init__(self, context: CompatContext, options: TightOptions):
        super().__init__(context, options)
        if options.tau == "stats":
            self.tau = float(mean_radius(self.fixed_radii, self.has_radius))
        self.schedule = _ADVERSARIAL_SCHEDULES[options.adversarial_schedule]
        self.class_conditional = options.discriminator == "class-conditional"
        if self.class_conditional and self.use_adversarial:
            self.discriminator = ClassConditionalDiscriminator(self.discriminator, context.num_classes)

    def radii(self) -> torch.Tensor:
        return elastic_radii(self.fixed_radii, self.radius_weights, self.tau) if self.elastic else self.fixed_radii

    def discriminator_for(self, batch: CompatBatch) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.class_conditional:
            return lambda emb: self.discriminator(emb, batch.labels)
        return self.discriminator

    def epoch_weight(self, batch: CompatBatch) -> float | torch.Tensor:
        return self.schedule(batch.epoch, batch.num_epochs)

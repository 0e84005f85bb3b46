"""The compatibility baselines the AdvBCT paper compares against: L2, BCT, LCE, UniBCT and Hot-refresh.

Every loss works on whole batches with masks (old classes only, other-class negatives only); none loops over
samples or looks classes up in Python dictionaries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advbct.compat.base import CompatBatch, CompatContext, CompatibilityMethod, LossOutput, register_method
from advbct.models.heads import margin_logits


def _global_to_local(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Lookup table global class id -> position in ``classes`` (-1 where absent)."""
    table = torch.full((num_classes,), -1, dtype=torch.long)
    table[classes] = torch.arange(classes.numel())
    return table


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)


def l2_regression_loss(new_emb: torch.Tensor, old_emb: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||f_new - f_old||^2 (sum over dimensions)."""
    return (new_emb.float() - old_emb.float()).pow(2).sum(1).mean()


@register_method("l2")
class L2Regression(CompatibilityMethod):
    """Regress the new embedding onto the old embedding of the same image."""

    def __init__(self, context: CompatContext, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def forward(self, batch: CompatBatch) -> LossOutput:
        loss = l2_regression_loss(batch.new_emb, batch.old_emb)
        return LossOutput(self.weight * loss, {"l2": loss})


@register_method("bct")
class BCT(CompatibilityMethod):
    """Influence loss: the frozen old classifier must classify new embeddings of old-class samples."""

    requires = ("old_head",)
    needs_old_embeddings = False
    batch_wide = True  # mean over the batch's old-class samples

    def __init__(self, context: CompatContext, weight: float = 1.0):
        super().__init__()
        self.weight = weight
        self.old_head = context.old_head
        classes = torch.as_tensor(context.old_head_classes, dtype=torch.long)
        self.register_buffer("to_old_index", _global_to_local(classes, context.num_classes))

    def forward(self, batch: CompatBatch) -> LossOutput:
        target = self.to_old_index[batch.labels]
        known = target >= 0
        logits = self.old_head(batch.new_emb.float())
        per_sample = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
        loss = _masked_mean(per_sample, known)
        return LossOutput(self.weight * loss, {"influence": loss})


def angle_between(emb: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Row-wise angle (radians) between ``emb`` and ``directions``."""
    cos = (F.normalize(emb.float(), dim=1) * F.normalize(directions.float(), dim=1)).sum(1)
    return torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))


@register_method("lce")
class LCE(CompatibilityMethod):
    """Angular boundary max(angle(c_y, f_new) - theta_y, 0) on old classes, plus alignment of the new
    classifier's weight of each old class with its old centre (1 - cosine)."""

    requires = ("statistics",)
    needs_old_embeddings = False
    batch_wide = True  # means over the batch's old-class samples

    def __init__(self, context: CompatContext, boundary_weight: float = 1.0, align_weight: float = 1.0):
        super().__init__()
        stats = context.statistics
        assert stats is not None  # guaranteed by `requires`
        self.boundary_weight, self.align_weight = boundary_weight, align_weight
        self.register_buffer("centres", stats.centres.clone())
        self.register_buffer("theta", stats.angular_radii.clone())
        self.register_buffer("has_radius", stats.has_radius.clone())
        # Index positions, not a boolean mask: masking a device tensor makes the host wait for its count.
        self.register_buffer("radius_classes", torch.nonzero(stats.has_radius).flatten())

    def forward(self, batch: CompatBatch) -> LossOutput:
        if batch.new_classifier is None:
            raise ValueError("LCE needs the new model's classifier weights in the batch")
        excess = (angle_between(batch.new_emb, self.centres[batch.labels]) - self.theta[batch.labels]).clamp(min=0)
        boundary = _masked_mean(excess, self.has_radius[batch.labels])
        old_rows = batch.new_classifier[self.radius_classes]
        align = (1 - F.cosine_similarity(old_rows.float(), self.centres[self.radius_classes], dim=1)).mean()
        total = self.boundary_weight * boundary + self.align_weight * align
        return LossOutput(total, {"boundary": boundary, "align": align})


@register_method("unibct")
class UniBCT(CompatibilityMethod):
    """The normalised old centres as a fixed classifier with an ArcFace margin, on old-class samples."""

    requires = ("statistics",)
    needs_old_embeddings = False
    batch_wide = True  # means over the batch's old-class samples

    def __init__(self, context: CompatContext, scale: float = 30.0, margin: float = 0.3, weight: float = 1.0):
        super().__init__()
        stats = context.statistics
        assert stats is not None  # guaranteed by `requires`
        old_classes = torch.nonzero(stats.counts > 0).flatten()
        self.scale, self.margin, self.weight = scale, margin, weight
        self.register_buffer("prototypes", F.normalize(stats.centres[old_classes], dim=1))
        self.register_buffer("to_old_index", _global_to_local(old_classes, stats.num_classes))

    def forward(self, batch: CompatBatch) -> LossOutput:
        target = self.to_old_index[batch.labels]
        known = target >= 0
        cos = F.normalize(batch.new_emb.float(), dim=1) @ self.prototypes.T
        logits = margin_logits(cos, target.clamp(min=0), self.scale, arc_margin=self.margin)
        loss = _masked_mean(F.cross_entropy(logits, target.clamp(min=0), reduction="none"), known)
        return LossOutput(self.weight * loss, {"prototype_ce": loss})


def hot_refresh_loss(
    new_emb: torch.Tensor, old_emb: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE from each new embedding: positive = the old embedding of the same image; negatives = old and
    new embeddings of the batch's samples of other classes (same-class samples are neither)."""
    n = F.normalize(new_emb.float(), dim=1)
    o = F.normalize(old_emb.float(), dim=1)
    other_class = labels.unsqueeze(0) != labels.unsqueeze(1)
    eye = torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
    to_old = (n @ o.T / temperature).masked_fill(~(other_class | eye), float("-inf"))
    to_new = (n @ n.T / temperature).masked_fill(~other_class, float("-inf"))
    logits = torch.cat([to_old, to_new], dim=1)
    return F.cross_entropy(logits, torch.arange(labels.numel(), device=labels.device))


@register_method("hot-refresh")
class HotRefresh(CompatibilityMethod):
    """New-to-old contrastive alignment (RACT / Hot-refresh, ICLR 2022)."""

    batch_wide = True  # negatives are the other samples of the (cross-rank gathered) batch

    def __init__(self, context: CompatContext, temperature: float = 0.01, weight: float = 1.0):
        super().__init__()
        self.temperature, self.weight = temperature, weight

    def forward(self, batch: CompatBatch) -> LossOutput:
        loss = hot_refresh_loss(batch.new_emb, batch.old_emb, batch.labels, self.temperature)
        return LossOutput(self.weight * loss, {"contrastive": loss})

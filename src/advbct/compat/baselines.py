"""The compatibility baselines the AdvBCT paper compares against: L2, BCT, LCE, UniBCT and Hot-refresh.

Every loss works on whole batches with masks (old classes only, other-class negatives only); none loops over
samples or looks classes up in Python dictionaries.
"""

from __future__ import annotations

from typing import Annotated

import pydantic
import torch
import torch.nn.functional as F

from advbct.compat.base import (
    CompatBatch,
    CompatContext,
    CompatibilityMethod,
    LossOutput,
    options_schema,
    register_method,
)
from advbct.models.heads import margin_logits


def _global_to_local(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Lookup table global class id -> position in ``classes`` (-1 where absent)."""
    table = torch.full((num_classes,), -1, dtype=torch.long)
    table[classes] = torch.arange(classes.numel())
    return table


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1)


def l2_regression_loss(new_emb: torch.Tensor, old_emb: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the L2-normalised new and old embeddings, over batch and dimensions.

    Retrieval compares directions, so only directions are regressed; and averaging over dimensions as well (torch's
    MSELoss) keeps the term on the scale of the classification loss, as the public AdvBCT code runs this baseline.
    """
    return F.mse_loss(F.normalize(new_emb.float(), dim=1), F.normalize(old_emb.float(), dim=1))


Weight = Annotated[float, pydantic.Field(ge=0.0)]


@options_schema
class WeightOptions:
    """The weight of the method's term beside the classification loss."""

    weight: Weight = 1.0


@register_method("l2", kind="baseline")
class L2Regression(CompatibilityMethod):
    """Regress the new embedding onto the old embedding of the same image."""

    Options = WeightOptions

    def __init__(self, context: CompatContext, options: WeightOptions):
        super().__init__()
        self.weight = options.weight

    def forward(self, batch: CompatBatch) -> LossOutput:
        loss = l2_regression_loss(batch.new_emb, batch.old_emb)
        return LossOutput(self.weight * loss, {"l2": loss})


@register_method("bct", kind="baseline")
class BCT(CompatibilityMethod):
    """Influence loss: the frozen old classifier must classify new embeddings of old-class samples."""

    Options = WeightOptions
    requires = ("old_head",)
    needs_old_embeddings = False
    batch_wide = True  # mean over the batch's old-class samples

    def __init__(self, context: CompatContext, options: WeightOptions):
        super().__init__()
        self.weight = options.weight
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


@options_schema
class LCEOptions:
    """The weights of LCE's two terms."""

    boundary_weight: Weight = 1.0
    align_weight: Weight = 1.0


@register_method("lce", kind="baseline")
class LCE(CompatibilityMethod):
    """Angular boundary max(angle(c_y, f_new) - theta_y, 0) on old classes, plus alignment of the new
    classifier's weight of each old class with its old centre (1 - cosine).

    Both terms are means over the batch's samples of classes with a radius, so a class weighs as often as it
    occurs: the public code aligns the classifier row of each sample's class, not every old class on every step.
    """

    Options = LCEOptions
    requires = ("statistics",)
    needs_old_embeddings = False
    batch_wide = True  # means over the batch's old-class samples

    def __init__(self, context: CompatContext, options: LCEOptions):
        super().__init__()
        stats = context.statistics
        assert stats is not None  # guaranteed by `requires`
        self.boundary_weight, self.align_weight = options.boundary_weight, options.align_weight
        self.register_buffer("centres", stats.centres.clone())
        self.register_buffer("theta", stats.angular_radii.clone())
        self.register_buffer("has_radius", stats.has_radius.clone())

    def forward(self, batch: CompatBatch) -> LossOutput:
        if batch.new_classifier is None:
            raise ValueError("LCE needs the new model's classifier weights in the batch")
        excess = (angle_between(batch.new_emb, self.centres[batch.labels]) - self.theta[batch.labels]).clamp(min=0)
        old_class = self.has_radius[batch.labels]
        boundary = _masked_mean(excess, old_class)
        rows = batch.new_classifier[batch.labels].float()
        align = _masked_mean(1 - F.cosine_similarity(rows, self.centres[batch.labels], dim=1), old_class)
        total = self.boundary_weight * boundary + self.align_weight * align
        return LossOutput(total, {"boundary": boundary, "align": align})


@options_schema
class UniBCTOptions:
    """The ArcFace scale and margin of the prototype classifier, and the term's weight."""

    scale: Annotated[float, pydantic.Field(gt=0.0)] = 30.0
    margin: Annotated[float, pydantic.Field(ge=0.0)] = 0.3
    weight: Weight = 1.0


@register_method("unibct", kind="baseline")
class UniBCT(CompatibilityMethod):
    """The normalised old centres as a fixed classifier with an ArcFace margin, on old-class samples."""

    Options = UniBCTOptions
    requires = ("statistics",)
    needs_old_embeddings = False
    batch_wide = True  # means over the batch's old-class samples

    def __init__(self, context: CompatContext, options: UniBCTOptions):
        super().__init__()
        stats = context.statistics
        assert stats is not None  # guaranteed by `requires`
        old_classes = torch.nonzero(stats.counts > 0).flatten()
        self.scale, self.margin, self.weight = options.scale, options.margin, options.weight
        self.register_buffer("prototypes", F.normalize(stats.centres[old_classes], dim=1))
        self.register_buffer("to_old_index", _global_to_local(old_classes, stats.num_classes))

    def forward(self, batch: CompatBatch) -> LossOutput:
        target = self.to_old_index[batch.labels]
        known = target >= 0
        cos = F.normalize(batch.new_emb.float(), dim=1) @ self.prototypes.T
        logits = margin_logits(cos, target.clamp(min=0), self.scale, arc_margin=self.margin)
        loss = _masked_mean(F.cross_entropy(logits, target.clamp(min=0), reduction="none"), known)
        return LossOutput(self.weight * loss, {"prototype_ce": loss})


PUBLIC_TOP_K_NEGATIVES = 10  # `topk_neg` in the defaults of the public Hot-refresh / AdvBCT code


def _hardest(similarity: torch.Tensor, valid: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Each row's ``top_k`` largest valid similarities; invalid entries are -inf, so where a row has fewer than
    ``top_k`` valid ones the rest come out -inf and take no part in a softmax. ``None`` keeps every column."""
    masked = similarity.masked_fill(~valid, float("-inf"))
    if top_k is None or top_k >= masked.shape[1]:
        return masked
    return masked.topk(top_k, dim=1).values


def hot_refresh_loss(
    new_emb: torch.Tensor,
    old_emb: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    top_k: int | None = PUBLIC_TOP_K_NEGATIVES,
    anchors: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE from each anchor's new embedding: positive = the old embedding of the same image; negatives = the
    ``top_k`` most similar old and the ``top_k`` most similar new embeddings of the batch's other-class samples
    (same-class samples are neither).

    ``anchors`` (row positions, all rows when None) are the samples whose loss is taken; the negatives come from
    the whole batch. Under data parallelism each rank anchors its own rows in the gathered batch, as the public code
    does, so every anchor is counted once over the ranks.
    """
    n = F.normalize(new_emb.float(), dim=1)
    o = F.normalize(old_emb.float(), dim=1)
    rows = torch.arange(labels.numel(), device=labels.device) if anchors is None else anchors
    queries = n[rows]
    positive = (queries * o[rows]).sum(1, keepdim=True)
    other_class = labels[rows].unsqueeze(1) != labels.unsqueeze(0)
    to_old = _hardest(queries @ o.T, other_class, top_k)
    to_new = _hardest(queries @ n.T, other_class, top_k)
    logits = torch.cat([positive, to_old, to_new], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros_like(rows))


@options_schema
class HotRefreshOptions:
    """The softmax temperature, the term's weight, and how many of the hardest negatives of each kind (old, new)
    an anchor keeps (None keeps all)."""

    temperature: Annotated[float, pydantic.Field(gt=0.0)] = 0.01
    weight: Weight = 1.0
    top_k_negatives: Annotated[pydantic.StrictInt, pydantic.Field(gt=0)] | None = PUBLIC_TOP_K_NEGATIVES


@register_method("hot-refresh", kind="baseline")
class HotRefresh(CompatibilityMethod):
    """New-to-old contrastive alignment (RACT / Hot-refresh, ICLR 2022) with the public code's hard negatives."""

    Options = HotRefreshOptions
    batch_wide = True  # negatives are the other samples of the (cross-rank gathered) batch
    local_anchors = True  # each rank anchors its own samples; rows from other ranks are constants

    def __init__(self, context: CompatContext, options: HotRefreshOptions):
        super().__init__()
        self.temperature, self.weight, self.top_k = options.temperature, options.weight, options.top_k_negatives

    def forward(self, batch: CompatBatch) -> LossOutput:
        loss = hot_refresh_loss(
            batch.new_emb, batch.old_emb, batch.labels, self.temperature, self.top_k, batch.local_rows
        )
        return LossOutput(self.weight * loss, {"contrastive": loss})

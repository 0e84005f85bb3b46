"""Classifier heads on the embedding: bias-free softmax, ArcFace and CosFace.

Heads take labels in ``forward`` because margin heads change the target logit; the plain softmax head ignores
them. All heads map (N, d) embeddings to (N, classes) logits ready for cross-entropy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SoftmaxHead(nn.Module):
    """A linear classifier without bias; it takes ``labels`` only to share the margin heads' signature."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(emb, self.weight)


def margin_logits(
    cos: torch.Tensor, labels: torch.Tensor, scale: float, arc_margin: float = 0.0, cos_margin: float = 0.0
) -> torch.Tensor:
    """s * cos(theta_y + m_arc) - s * m_cos on each row's target column, s * cos(theta) elsewhere.

    Past theta = pi - m_arc the angle would wrap around; there the ArcFace term falls back to a linear
    penalty, as the reference ArcFace implementation does, so the target logit keeps decreasing.
    """
    cos = cos.float()  # under bf16 autocast the cosines arrive in bf16; margins need float32 precision
    target = cos.gather(1, labels.view(-1, 1)).clamp(-1 + 1e-7, 1 - 1e-7)
    shifted = target
    if arc_margin:
        theta = torch.acos(target)
        shifted = torch.where(
            theta + arc_margin < math.pi, torch.cos(theta + arc_margin), target - arc_margin * math.sin(arc_margin)
        )
    return scale * cos.scatter(1, labels.view(-1, 1), shifted - cos_margin)


class CosineMarginHead(nn.Module):
    """ArcFace / CosFace: margin on the target logit while training; plain s * cos(theta) at eval."""

    def __init__(self, dim: int, num_classes: int, scale: float, arc_margin: float, cos_margin: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.arc_margin, self.cos_margin = scale, arc_margin, cos_margin

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = F.linear(F.normalize(emb.float(), dim=1), F.normalize(self.weight.float(), dim=1))
        if labels is None or not self.training:
            return self.scale * cos
        return margin_logits(cos, labels, self.scale, self.arc_margin, self.cos_margin)


def make_head(kind: str, dim: int, num_classes: int, scale: float, margin: float) -> nn.Module:
    if kind == "softmax":
        return SoftmaxHead(dim, num_classes)
    if kind == "arcface":
        return CosineMarginHead(dim, num_classes, scale, arc_margin=margin, cos_margin=0.0)
    if kind == "cosface":
        return CosineMarginHead(dim, num_classes, scale, arc_margin=0.0, cos_margin=margin)
    raise ValueError(f"unknown head {kind!r}; use softmax, arcface or cosface")

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
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(emb, self.weight)


class CosineMarginHead(nn.Module):
    """s * cos(theta + m_arc) - s * m_cos on the target class; plain s * cos(theta) elsewhere and at eval."""

    def __init__(self, dim: int, num_classes: int, scale: float, arc_margin: float, cos_margin: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.arc_margin, self.cos_margin = scale, arc_margin, cos_margin

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = F.linear(F.normalize(emb.float(), dim=1), F.normalize(self.weight.float(), dim=1))
        if labels is None or not self.training:
            return self.scale * cos
        target = cos.gather(1, labels.view(-1, 1)).clamp(-1 + 1e-7, 1 - 1e-7)
        if self.arc_margin:
            theta = torch.acos(target)
            # Past pi - m the angle would wrap around; fall back to the CosFace-style penalty there.
            shifted = torch.where(
                theta + self.arc_margin < math.pi,
                torch.cos(theta + self.arc_margin),
                target - self.arc_margin * math.sin(self.arc_margin),
            )
        else:
            shifted = target
        shifted = shifted - self.cos_margin
        return self.scale * cos.scatter(1, labels.view(-1, 1), shifted)


def make_head(kind: str, dim: int, num_classes: int, scale: float, margin: float) -> nn.Module:
    if kind == "softmax":
        return SoftmaxHead(dim, num_classes)
    if kind == "arcface":
        return CosineMarginHead(dim, num_classes, scale, arc_margin=margin, cos_margin=0.0)
    if kind == "cosface":
        return CosineMarginHead(dim, num_classes, scale, arc_margin=0.0, cos_margin=margin)
    raise ValueError(f"unknown head {kind!r}; use softmax, arcface or cosface")

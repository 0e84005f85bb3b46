"""A frozen patch-whitening stem: the first convolution set from the training images instead of learned.

The stem conv's filters are the leading eigenvectors of the covariance of the image patches it sees, each scaled
by 1 / sqrt(eigenvalue + eps) and used with both signs (so the ReLU after the stem's batch norm passes either
half). Its outputs are decorrelated and of equal scale from the first step, the property the fast CIFAR
training recipes (tysam-code's hlb-cifar10, Keller Jordan's airbench) rely on to make short runs learn quickly.
Frozen, the stem cannot drift from that, and it costs nothing in the backward pass.

Channels beyond twice the patch dimension keep their random initialisation (also frozen): a 3x3 RGB patch has
27 dimensions, so a 64-channel stem gets 54 whitening filters and 10 random ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def patch_covariance(images: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Covariance (in float64) of the patches ``conv`` reads from ``images``: its kernel, stride and padding."""
    patches = F.unfold(images.float(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    flat = patches.transpose(1, 2).reshape(-1, patches.shape[1]).double()
    return torch.cov(flat.T)


def whitening_filters(covariance: torch.Tensor, pairs: int, eps: float) -> torch.Tensor:
    """(2 * pairs, patch_dim) filters: the top ``pairs`` eigenvectors scaled by 1 / sqrt(lambda + eps), then
    the same with the opposite sign. Each eigenvector's sign is fixed (largest entry positive) so the filters
    do not depend on the eigensolver's arbitrary sign choice."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    order = eigenvalues.argsort(descending=True)[:pairs]
    vectors = eigenvectors[:, order]
    vectors = vectors * vectors.gather(0, vectors.abs().argmax(0, keepdim=True)).sign()
    scaled = (vectors / (eigenvalues[order].clamp(min=0) + eps).sqrt()).T
    return torch.cat([scaled, -scaled])


def set_whitened_stem(conv: nn.Conv2d, images: torch.Tensor, eps: float = 1e-2) -> None:
    """Overwrite the leading filters of ``conv`` with patch-whitening filters of ``images`` (normalised floats,
    N x C x H x W); it must be a bias-free convolution over all input channels (groups 1)."""
    if conv.groups != 1 or conv.bias is not None:
        raise ValueError("a whitened stem needs a plain bias-free convolution (groups=1, bias=False)")
    if images.ndim != 4 or images.shape[1] != conv.in_channels:
        raise ValueError(f"whitening needs N x {conv.in_channels} x H x W images, got {tuple(images.shape)}")
    patch_dim = conv.weight[0].numel()
    pairs = min(conv.out_channels // 2, patch_dim)
    filters = whitening_filters(patch_covariance(images, conv), pairs, eps)
    with torch.no_grad():
        conv.weight[: 2 * pairs] = filters.view(2 * pairs, *conv.weight.shape[1:]).to(conv.weight)

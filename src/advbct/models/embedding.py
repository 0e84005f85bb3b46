"""The retrieval model: timm backbone -> Linear(no bias) -> BatchNorm1d embedding -> classifier head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from advbct.models.heads import make_head
from advbct.models.whitening import set_whitened_stem


def _small_input_stem(backbone: nn.Module, name: str, keep_pool: bool, stride: int) -> None:
    """3x3 stem of stride 1 or 2 instead of ImageNet's 7x7 stride-2 conv and pool, for 32x32 images.

    At stride 1 with no pool every pixel reaches the first block (the paper's CIFAR setting). Halving the
    resolution once, by keeping the max-pool (``keep_pool``) or by ``stride`` 2, quarters the compute of every
    later layer; stride 2 also runs the stem's own batch norm and ReLU at the lower resolution, which the pooled
    stride-1 stem does not. Both together (the quickstart and cpu-large presets) start the blocks at 8x8, cheap
    enough for CPU runs; ``bench/bench_stem.py`` times the four combinations.
    """
    conv1 = getattr(backbone, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(backbone, "maxpool"):
        raise ValueError(
            f"small_input is supported for ResNet-style timm models (conv1 + maxpool); {name!r} has no such stem"
        )
    backbone.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride, 1, bias=False)
    if not keep_pool:
        backbone.maxpool = nn.Identity()


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local state dict (e.g. timm's ImageNet weights saved to disk) with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith(("fc.", "head.", "classifier."))]
    if unexpected:
        raise ValueError(f"{path}: weights do not fit the backbone; unexpected keys {unexpected[:5]}")
    if len(missing) > len(backbone.state_dict()) // 2:
        raise ValueError(f"{path}: weights do not fit the backbone; {len(missing)} keys missing")


class EmbeddingModel(nn.Module):
    """Any timm backbone as a retrieval model. The embedding is what galleries store and what compatibility is
    about; the classifier head is there to train it."""

    def __init__(
        self,
        backbone: str,
        embedding_dim: int,
        num_classes: int,
        head: str = "softmax",
        head_scale: float = 30.0,
        head_margin: float = 0.3,
        small_input: bool = False,
        small_input_pool: bool = False,
        small_input_stride: int = 1,
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        weights: str | None = None,
        whitened_stem: bool = False,
    ):
        super().__init__()
        self.backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=0, **dict(backbone_kwargs or {}))
        if weights:
            load_backbone_weights(self.backbone, weights)
        if small_input:
            _small_input_stem(self.backbone, backbone, small_input_pool, small_input_stride)
        self.whitened_stem = whitened_stem
        if whitened_stem:
            if not isinstance(getattr(self.backbone, "conv1", None), nn.Conv2d):
                raise ValueError(
                    f"a whitened stem needs a backbone whose stem is one conv (conv1); {backbone!r} has none"
                )
            self.backbone.conv1.weight.requires_grad_(False)
        self.proj = nn.Linear(self.backbone.num_features, embedding_dim, bias=False)
        self.bn = nn.BatchNorm1d(embedding_dim)
        self.head = make_head(head, embedding_dim, num_classes, head_scale, head_margin)
        self.embedding_dim = embedding_dim

    def whiten_stem(self, images: torch.Tensor) -> None:
        """Set the frozen stem's filters from normalised training ``images`` (see ``advbct.models.whitening``)."""
        if not self.whitened_stem:
            raise ValueError("whiten_stem on a model built without whitened_stem")
        set_whitened_stem(self.backbone.conv1, images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The (unnormalised) embedding; retrieval L2-normalises it."""
        return self.bn(self.proj(self.backbone(images)))

    def classify(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits of embeddings; margin heads need the ``labels`` while training (see ``heads``)."""
        return self.head(emb, labels)

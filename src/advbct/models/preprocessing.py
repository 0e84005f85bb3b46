"""The evaluation transform a trained model is recorded with, decided once when its training starts.

A backbone that starts from ImageNet weights (``pretrained`` or a local ``weights`` file of timm's) keeps the
normalisation and framing its weights were made for, read from timm's pretrained config of the backbone; nothing is
downloaded for it. A model trained from scratch is normalised by the statistics of its own training images. The
input size is always the size the model trains at (``data.image_size``): a pretrained backbone fine-tuned on
32-pixel images is evaluated on 32-pixel images, not at the size of its ImageNet weights.
"""

from __future__ import annotations

import torch
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg

from advbct.config import ConfigError, DataConfig, ModelConfig
from advbct.data.batches import Preprocessing, channel_statistics
from advbct.data.images import RESAMPLING


def pretrained_preprocessing(backbone: str, image_size: int) -> Preprocessing:
    """The mean, std, centre-crop fraction and interpolation of ``backbone``'s default pretrained weights in timm
    (``resnet50`` or a tagged name such as ``resnet50.a1_in1k``), at ``image_size``."""
    pretrained = get_pretrained_cfg(backbone)
    if pretrained is None:
        raise ConfigError(
            f"model.backbone: timm has no pretrained config for {backbone!r} to take its normalisation from"
        )
    resolved = resolve_data_config({}, pretrained_cfg=pretrained.to_dict())
    if resolved.get("crop_mode", "center") != "center" or resolved["interpolation"] not in RESAMPLING:
        raise ConfigError(
            f"model.backbone: {backbone!r}: timm's evaluation transform ({resolved.get('crop_mode')} crop, "
            f"{resolved['interpolation']} interpolation) is not one advbct can apply (centre crop; "
            f"{', '.join(RESAMPLING)})"
        )
    return Preprocessing(
        image_size,
        mean=tuple(float(v) for v in resolved["mean"]),
        std=tuple(float(v) for v in resolved["std"]),
        crop_fraction=float(resolved["crop_pct"]),
        interpolation=resolved["interpolation"],
    )


def training_preprocessing(model: ModelConfig, data: DataConfig, train_images: torch.Tensor) -> Preprocessing:
    """The transform recorded in a model trained with ``model`` on ``train_images`` (uint8, N x 3 x H x W).

    CIFAR-100 keeps its published training-split statistics (``CIFAR100_MEAN``, ``CIFAR100_STD``), so a CIFAR model
    is normalised the same whichever part of the split it trains on, and runs stay comparable with earlier ones.
    """
    if model.pretrained or model.weights:
        return pretrained_preprocessing(model.backbone, data.image_size)
    if data.dataset == "cifar100":
        return Preprocessing(data.image_size)
    mean, std = channel_statistics(train_images)
    return Preprocessing(data.image_size, mean, std)

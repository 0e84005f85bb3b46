"""The evaluation transform a trained model is recorded with, decided once when its training starts.

A backbone that starts from ImageNet weights (``pretrained`` or a local ``weights`` file of timm's) keeps the
normalisation its weights were made for, read from timm's pretrained config of the backbone; nothing is downloaded
for it. A model trained from scratch is normalised by the statistics of its own training images. The framing is the
one the model is trained, tested and gated on: the whole short side, bicubic, at the size the model trains at
(``data.image_size``), as image folders are decoded for training. Serving frames the same way, so a fine-tuned
pretrained backbone never sees one crop in training and another in the gallery (timm's ImageNet crop fraction
belongs to evaluating at the weights' own resolution, which these models are not).
"""

from __future__ import annotations

import torch
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg

from advbct.config import ConfigError, DataConfig, ModelConfig
from advbct.data.batches import Preprocessing, channel_statistics


def pretrained_preprocessing(backbone: str, image_size: int) -> Preprocessing:
    """The mean and std of ``backbone``'s default pretrained weights in timm (``resnet50`` or a tagged name such
    as ``resnet50.a1_in1k``), with the training framing at ``image_size``."""
    pretrained = get_pretrained_cfg(backbone)
    if pretrained is None:
        raise ConfigError(
            f"model.backbone: timm has no pretrained config for {backbone!r} to take its normalisation from"
        )
    resolved = resolve_data_config({}, pretrained_cfg=pretrained.to_dict())
    mean, std = (tuple(float(v) for v in resolved[key]) for key in ("mean", "std"))
    return Preprocessing(image_size, mean=mean, std=std)


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

"""One entry point from a DataConfig to the train/test ImageSets a run uses."""

from __future__ import annotations

from pathlib import Path

import torch

from advbct.config import DataConfig
from advbct.data.allocation import random_rank_within_class
from advbct.data.cifar import load_cifar100
from advbct.data.images import DataError, ImageSet, load_image_folder


def sample_per_class(labels: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """Indices of a seeded random ``limit`` samples of every class (all of a class that has fewer)."""
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    by_class, rank = random_rank_within_class(labels, num_classes, torch.Generator().manual_seed(seed))
    return by_class[rank < limit].sort().values


def load_split(cfg: DataConfig, split: str) -> ImageSet:
    """The ``train`` or ``test`` split named by the config, trimmed to its per-class limit."""
    name = cfg.train_split if split == "train" else cfg.test_split
    if cfg.dataset == "cifar100":
        images = load_cifar100(cfg.root, name, cfg.image_size)
    else:
        if cfg.root is None:
            raise DataError("data.root is required for dataset image-folder (<root>/<split>/<class>/<file>)")
        images = load_image_folder(Path(cfg.root) / name, cfg.image_size)
    limit = cfg.max_train_per_class if split == "train" else cfg.max_test_per_class
    if limit is not None:
        images = images.subset(sample_per_class(images.labels, limit, cfg.allocation_seed))
    return images

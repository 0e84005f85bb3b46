"""CIFAR-100: from an image-folder copy (``<root>/train|test/<class>/*.png``) or torchvision's download.

Resolution order for the root: an explicit path, ``$ADVBCT_DATA``, ``../shared/data`` beside the working
directory, then torchvision's downloader. A path that is given but wrong is an error, never a silent fallback.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from advbct.data.images import DataError, ImageSet, default_cache_dir, load_image_folder


def _as_cifar_folder(path: Path) -> Path | None:
    for candidate in (path, path / "cifar100"):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    return None


def find_cifar100_root(explicit: str | Path | None = None) -> Path | None:
    """The image-folder copy to use, or None when torchvision should download it."""
    if explicit is not None:
        found = _as_cifar_folder(Path(explicit))
        if found is None:
            raise DataError(
                f"data root {explicit} holds no CIFAR-100 image folders (expected train/ and test/ "
                "inside it or inside its cifar100/ folder)"
            )
        return found
    env = os.environ.get("ADVBCT_DATA")
    if env:
        found = _as_cifar_folder(Path(env))
        if found is None:
            raise DataError(f"ADVBCT_DATA={env} holds no cifar100/ folder with train/ and test/")
        return found
    return _as_cifar_folder(Path.cwd().parent / "shared" / "data")


def _torchvision_split(train: bool) -> ImageSet:
    from torchvision.datasets import CIFAR100

    root = default_cache_dir() / "torchvision"
    try:
        ds = CIFAR100(str(root), train=train, download=True)
    except Exception as exc:  # network errors surface as many different types
        raise DataError(
            f"CIFAR-100 is not available locally and the download failed ({exc}); "
            "pass --data DIR or set ADVBCT_DATA to a folder with cifar100/train and cifar100/test"
        ) from exc
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return ImageSet(images, torch.as_tensor(ds.targets, dtype=torch.int64), tuple(ds.classes))


def load_cifar100(root: str | Path | None, split: str, size: int = 32) -> ImageSet:
    """One split (``train`` or ``test``) as an in-memory uint8 ImageSet."""
    folder = find_cifar100_root(root)
    if folder is None:
        if size != 32:
            raise DataError("the torchvision download is 32x32; use image_size=32")
        return _torchvision_split(split == "train")
    return load_image_folder(folder / split, size)

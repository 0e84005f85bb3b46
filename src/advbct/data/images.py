"""Image-folder datasets decoded once into an in-memory uint8 tensor, cached on disk.

Small retrieval benchmarks (CIFAR-100, 60k 32x32 images) fit in a few hundred MB as uint8, and a training step
that indexes a tensor is far faster than one that decodes PNG files through a DataLoader. The cache is a plain
``.npz`` file read with ``allow_pickle=False``, so a cache file handed over by someone else cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from advbct.errors import AdvbctError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class DataError(AdvbctError):
    """Input data is missing or unreadable; the message names the file or folder."""


@dataclass(frozen=True)
class ImageSet:
    """Decoded images (N, 3, H, W) uint8, integer labels (N,), and the class names labels index into."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise DataError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError("labels must have one entry per image")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices], self.classes)


def list_image_folder(split_dir: Path) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """Files of ``<split_dir>/<class>/<file>``; classes sorted by name as torchvision's ImageFolder does."""
    if not split_dir.is_dir():
        raise DataError(f"image folder not found: {split_dir}")
    classes = tuple(sorted(d.name for d in split_dir.iterdir() if d.is_dir()))
    if not classes:
        raise DataError(f"no class folders in {split_dir} (expected <split>/<class>/<image files>)")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        for entry in sorted(os.scandir(split_dir / name), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
                files.append((Path(entry.path), label))
    if not files:
        raise DataError(f"no image files under {split_dir}")
    return files, classes


def square_rgb(
    img: Image.Image,
    size: int,
    box: tuple[float, float, float, float] | None = None,
    whole: bool = False,
    crop_fraction: float = 1.0,
    interpolation: str = "bicubic",
) -> np.ndarray:
    """An opened image as RGB uint8 (size, size, 3).

    By default the centre square of side ``crop_fraction`` times the short side is cut out and resized (the
    classification convention; timm's evaluation transform resizes first and crops ``crop_pct`` of the result,
    which frames the same region). ``whole=True`` resizes the whole image to the square instead, and ``box`` =
    (x1, y1, x2, y2) cuts that region out first: landmark benchmarks define what must be seen (a query's box, a
    whole database photo), so nothing of it may be cropped away.
    """
    img = img.convert("RGB")
    if box is not None:
        img = img.crop(tuple(round(v) for v in box))
        if img.width < 1 or img.height < 1:
            raise ValueError(f"box {box} is empty")
    elif not whole and (img.width != img.height or crop_fraction < 1.0):
        side = max(1, round(min(img.size) * crop_fraction))
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLING[interpolation])
    return np.asarray(img, dtype=np.uint8)


def decode_image(
    path: Path,
    size: int,
    box: tuple[float, float, float, float] | None = None,
    whole: bool = False,
    crop_fraction: float = 1.0,
    interpolation: str = "bicubic",
) -> np.ndarray:
    """The image file as ``square_rgb`` makes it; a file that cannot be decoded is a DataError naming it."""
    try:
        with Image.open(path) as img:
            return square_rgb(img, size, box, whole, crop_fraction, interpolation)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from None


def _cache_key(files: list[tuple[Path, int]], classes: tuple[str, ...], size: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([size, list(classes)]).encode())
    for path, label in files:
        stat = path.stat()
        digest.update(f"{path}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def default_cache_dir() -> Path:
    return Path(os.environ.get("ADVBCT_CACHE", Path.home() / ".cache" / "advbct"))


def load_image_folder(
    split_dir: str | Path, size: int, cache_dir: Path | None = None, workers: int | None = None
) -> ImageSet:
    """Decode every image under ``split_dir`` (or read the cache made from the same files)."""
    split_dir = Path(split_dir)
    files, classes = list_image_folder(split_dir)
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    cache_file = cache_dir / f"images-{_cache_key(files, classes, size)}.npz"
    if cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as npz:
            return ImageSet(
                torch.from_numpy(npz["images"]),
                torch.from_numpy(npz["labels"]),
                tuple(npz["classes"].tolist()),
            )
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        arrays = list(pool.map(lambda item: decode_image(item[0], size), files))
    images = np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))
    labels = np.asarray([label for _, label in files], dtype=np.int64)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(cache_file.name + f".{os.getpid()}.{threading.get_ident()}.tmp.npz")
    np.savez(tmp, images=images, labels=labels, classes=np.asarray(classes))
    tmp.replace(cache_file)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), classes)

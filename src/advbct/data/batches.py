"""Batches straight from an in-memory uint8 tensor, with augmentation done on whole batches.

Pad-and-crop and horizontal flip are computed for the batch at once (one gather), on whatever device the batch
lives on, so the same code is the CPU path and the GPU fast path and no per-sample Python loop runs per step.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from advbct.data.images import RESAMPLING, decode_image, square_rgb
from advbct.distributed import World

# The per-channel mean and standard deviation of CIFAR-100's training split (pixel values in [0, 1]).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class Preprocessing:
    """What a checkpoint needs to embed an image the way it was trained: the square input size, the
    normalisation, and how an image file is framed (the centre ``crop_fraction`` of its short side, resized with
    ``interpolation``). Evaluation and serving take all of it from the checkpoint. The defaults (CIFAR-100
    statistics, the whole short side, bicubic) are what a checkpoint that records no framing was trained with."""

    image_size: int
    mean: tuple[float, float, float] = CIFAR100_MEAN
    std: tuple[float, float, float] = CIFAR100_STD
    crop_fraction: float = 1.0
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must lie in (0, 1], got {self.crop_fraction}")
        if self.interpolation not in RESAMPLING:
            raise ValueError(f"interpolation must be one of {', '.join(RESAMPLING)}, got {self.interpolation!r}")

    def to_json(self) -> dict:
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_fraction": self.crop_fraction,
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_json(cls, tree: dict) -> Preprocessing:
        """Read back ``to_json``; a key an older checkpoint lacks keeps its default (today's behaviour)."""
        fields = {key: tree[key] for key in ("crop_fraction", "interpolation") if key in tree}
        fields |= {key: tuple(tree[key]) for key in ("mean", "std") if key in tree}
        return cls(int(tree["image_size"]), **fields)

    def decode(
        self, path: Path, box: tuple[float, float, float, float] | None = None, whole: bool = False
    ) -> np.ndarray:
        """An image file as this model's uint8 (size, size, 3) input, framed as recorded (see ``square_rgb``)."""
        return decode_image(path, self.image_size, box, whole, self.crop_fraction, self.interpolation)

    def square(self, image: Image.Image) -> np.ndarray:
        """An opened image (an upload) as this model's uint8 (size, size, 3) input."""
        return square_rgb(image, self.image_size, crop_fraction=self.crop_fraction, interpolation=self.interpolation)


def channel_statistics(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation (population) of uint8 images (N, 3, H, W), in [0, 1] units: the
    normalisation of a model trained from scratch on them. Sums are taken in float64 over chunks of images, so
    memory stays bounded and the result does not depend on the chunk size beyond rounding."""
    if images.shape[0] == 0:
        raise ValueError("no images to take channel statistics of")
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].to(torch.float64) / 255.0
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp(min=0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


@functools.lru_cache(maxsize=32)
def _normalisation_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) in uint8 units on ``device``, made once: a fresh host-to-GPU copy per batch would make the
    CPU wait for every queued kernel before it could queue the next step."""
    mean_t = torch.tensor(mean).view(1, 3, 1, 1).to(device) * 255.0
    inv_std = 1.0 / (torch.tensor(std).view(1, 3, 1, 1).to(device) * 255.0)
    return mean_t, inv_std


def normalise(images: torch.Tensor, prep: Preprocessing, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float normalised, on the images' device."""
    mean, inv_std = _normalisation_constants(tuple(prep.mean), tuple(prep.std), images.device)
    out = (images.float() - mean) * inv_std
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def crop_flip_params(
    n: int, padding: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image vertical and horizontal crop offsets in [0, 2 * padding] and flip flags, drawn on the CPU."""
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)
    flip = torch.rand(n, 1, 1, generator=generator) < 0.5
    return dy, dx, flip


def apply_crop_flip(
    images: torch.Tensor, padding: int, params: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Zero-pad by ``padding``, crop each image at its offsets, mirror the flagged ones: one gather per batch."""
    n, _, h, w = images.shape
    device = images.device
    dy, dx, flip = (t.to(device) for t in params)  # a no-op where the caller drew them on the device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = torch.arange(h, device=device).view(1, h, 1) + dy
    cols = torch.arange(w, device=device).view(1, 1, w).expand(n, 1, w)
    cols = torch.where(flip, w - 1 - cols, cols) + dx
    batch = torch.arange(n, device=device).view(n, 1, 1)
    # Advanced indexing on (N, H, W) index grids, channels kept as a slice: one gather for the whole batch.
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding``, take a random crop of the original size per image, flip half of them."""
    return apply_crop_flip(images, padding, crop_flip_params(images.shape[0], padding, generator))


class BatchStream:
    """Seeded epochs over (images, labels); ``epoch(e, start_step)`` is reproducible for a resumed run.

    With a world of several processes, each step's global batch is the same as in a single process and rank r
    gets every world-th sample of it: the epoch order comes from ``DistributedSampler`` (seeded, reshuffled per
    epoch with ``set_epoch``), and the crop and flip of every sample are drawn for the whole global batch, so a
    sample is augmented the same way whichever rank holds it. Resuming with another world size therefore
    continues the same sequence of global batches.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        seed: int,
        augment: bool,
        world: World | None = None,
    ):
        self.world = world or World()
        if images.shape[0] < batch_size:
            batch_size = images.shape[0] - images.shape[0] % self.world.size
        if batch_size % self.world.size:
            raise ValueError(f"batch size {batch_size} does not split over {self.world.size} processes")
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.augment = batch_size, seed, augment

    def __len__(self) -> int:
        return self.images.shape[0] // self.batch_size if self.batch_size else 0

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        # The sampler seeds each epoch with seed + epoch; spreading the seeds 100_003 apart keeps run s's later
        # epochs from replaying run s + 1's earlier ones.
        sampler = DistributedSampler(
            range(self.images.shape[0]),
            num_replicas=self.world.size,
            rank=self.world.rank,
            shuffle=True,
            seed=self.seed * 100_003,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
        return torch.as_tensor(list(sampler), dtype=torch.long)

    def _epoch_crops(self, epoch: int, steps: range, padding: int) -> tuple[torch.Tensor, ...]:
        """This rank's crop offsets and flips for ``steps``, stacked (steps, per_rank, 1, 1). One generator per
        step, so a run resumed mid-epoch draws the same crops as an unbroken one; its seed packs (seed, epoch, step)
        with primes larger than any epoch or step count, so no two steps of any run share one."""
        per_step = [
            crop_flip_params(
                self.batch_size, padding, torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_000_003 + s)
            )
            for s in steps
        ]
        rank, size = self.world.rank, self.world.size
        return tuple(torch.stack([params[i][rank::size] for params in per_step]) for i in range(3))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from ``start_step`` on. The order and every crop are drawn on the CPU and moved to
        the images' device once per epoch: a copy per step would stall the CPU until the GPU caught up."""
        steps = range(start_step, len(self))
        per_rank = self.batch_size // self.world.size
        padding = max(1, self.images.shape[-1] // 8)
        device = self.images.device
        order = self._epoch_order(epoch)[start_step * per_rank : len(self) * per_rank].to(device)
        crops = tuple(t.to(device) for t in self._epoch_crops(epoch, steps, padding)) if self.augment else ()
        for i in range(len(steps)):
            idx = order[i * per_rank : (i + 1) * per_rank]
            images = self.images[idx]
            if self.augment:
                images = apply_crop_flip(images, padding, tuple(t[i] for t in crops))
            yield images, self.labels[idx]

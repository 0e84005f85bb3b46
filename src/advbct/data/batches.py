"""Batches straight from an in-memory uint8 tensor, with augmentation done on whole batches.

Pad-and-crop and horizontal flip are computed for the batch at once (one gather), on whatever device the batch
lives on, so the same code is the CPU path and the GPU fast path and no per-sample Python loop runs per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DistributedSampler

from advbct.distributed import World

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class Preprocessing:
    """What a checkpoint needs to embed an image the way it was trained: size and normalisation."""

    image_size: int
    mean: tuple[float, float, float] = CIFAR100_MEAN
    std: tuple[float, float, float] = CIFAR100_STD

    def to_json(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, tree: dict) -> Preprocessing:
        return cls(int(tree["image_size"]), tuple(tree["mean"]), tuple(tree["std"]))


def normalise(images: torch.Tensor, prep: Preprocessing, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float normalised, on the images' device."""
    mean = torch.tensor(prep.mean, device=images.device).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(prep.std, device=images.device).view(1, 3, 1, 1) * 255.0)
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
    dy, dx, flip = (t.to(device) for t in params)
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

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._epoch_order(epoch)
        per_rank, rank, size = self.batch_size // self.world.size, self.world.rank, self.world.size
        padding = max(1, self.images.shape[-1] // 8)
        for step in range(start_step, len(self)):
            idx = order[step * per_rank : (step + 1) * per_rank].to(self.images.device)
            images = self.images[idx]
            if self.augment:
                # One generator per step, so a run resumed mid-epoch draws the same crops as an unbroken one.
                step_gen = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_000_003 + step)
                params = crop_flip_params(self.batch_size, padding, step_gen)
                images = apply_crop_flip(images, padding, tuple(t[rank::size] for t in params))
            yield images, self.labels[idx]

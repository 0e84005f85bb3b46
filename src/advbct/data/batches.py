"""Batches straight from an in-memory uint8 tensor, with augmentation done on whole batches.

Pad-and-crop and horizontal flip are computed for the batch at once (one gather), on whatever device the batch
lives on, so the same code is the CPU path and the GPU fast path and no per-sample Python loop runs per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

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


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding``, take a random crop of the original size per image, flip half of them."""
    n, _, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator).to(device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator).to(device)
    flip = (torch.rand(n, 1, 1, generator=generator) < 0.5).to(device)
    rows = torch.arange(h, device=device).view(1, h, 1) + dy
    cols = torch.arange(w, device=device).view(1, 1, w).expand(n, 1, w)
    cols = torch.where(flip, w - 1 - cols, cols) + dx
    batch = torch.arange(n, device=device).view(n, 1, 1)
    # Advanced indexing on (N, H, W) index grids, channels kept as a slice: one gather for the whole batch.
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


class BatchStream:
    """Seeded epochs over (images, labels); ``epoch(e)`` is reproducible for a resumed run."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, augment: bool):
        if images.shape[0] < batch_size:
            batch_size = images.shape[0]
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.augment = batch_size, seed, augment

    def __len__(self) -> int:
        return self.images.shape[0] // self.batch_size

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.images.shape[0], generator=gen)
        for step in range(len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size].to(self.images.device)
            if step < start_step:
                continue
            images = self.images[idx]
            if self.augment:
                # One generator per step, so a run resumed mid-epoch draws the same crops as an unbroken one.
                step_gen = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_000_003 + step)
                images = random_crop_flip(images, padding=max(1, images.shape[-1] // 8), generator=step_gen)
            yield images, self.labels[idx]

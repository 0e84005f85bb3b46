"""Old/new training-set allocations, seeded and saved beside the run.

Every method in a comparison must train on the same split, so the allocation is a file (JSON, human-readable)
that later runs load instead of re-deriving it from a seed that a library upgrade could silently change.
The new model always sees the whole training set; the old set is a subset of it by construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from advbct.config import AllocationKind
from advbct.data.images import DataError


@dataclass(frozen=True)
class Allocation:
    kind: AllocationKind
    old_fraction: float
    seed: int
    num_classes: int
    num_samples: int
    old_classes: tuple[int, ...]
    old_indices: torch.Tensor

    @property
    def new_indices(self) -> torch.Tensor:
        return torch.arange(self.num_samples)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "old_fraction": self.old_fraction,
            "seed": self.seed,
            "num_classes": self.num_classes,
            "num_samples": self.num_samples,
            "old_classes": list(self.old_classes),
            "old_indices": self.old_indices.tolist(),
        }

    def summary(self) -> dict:
        """Everything except the index list, for checkpoint metadata."""
        out = self.to_json()
        out.pop("old_indices")
        out["num_old_samples"] = int(self.old_indices.numel())
        return out

    @classmethod
    def from_json(cls, tree: dict) -> Allocation:
        return cls(
            kind=tree["kind"],
            old_fraction=float(tree["old_fraction"]),
            seed=int(tree["seed"]),
            num_classes=int(tree["num_classes"]),
            num_samples=int(tree["num_samples"]),
            old_classes=tuple(int(c) for c in tree["old_classes"]),
            old_indices=torch.as_tensor(tree["old_indices"], dtype=torch.int64),
        )


def random_rank_within_class(
    labels: torch.Tensor, num_classes: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample indices grouped by class in a random order, and each one's rank inside its class.

    A stable sort by label of a random permutation keeps the random order inside each class; subtracting the
    class's start offset gives the rank. Taking ``rank < k`` then picks k random samples of every class at once.
    """
    order = torch.randperm(labels.numel(), generator=generator)
    by_class = order[torch.sort(labels[order], stable=True).indices]
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    return by_class, torch.arange(labels.numel()) - starts[labels[by_class]]


def make_allocation(
    labels: torch.Tensor, num_classes: int, kind: AllocationKind, old_fraction: float, seed: int
) -> Allocation:
    """extended-class: a seeded ``old_fraction`` of the classes, all their images.
    extended-data: ``round(old_fraction * n_c)`` seeded images of every class c (at least one)."""
    gen = torch.Generator().manual_seed(seed)
    labels = labels.to(torch.int64).cpu()
    if kind == "extended-class":
        n_old = max(1, round(old_fraction * num_classes))
        old_classes = torch.randperm(num_classes, generator=gen)[:n_old].sort().values
        old_mask = torch.isin(labels, old_classes)
    elif kind == "extended-data":
        old_classes = torch.arange(num_classes)
        by_class, rank = random_rank_within_class(labels, num_classes, gen)
        counts = torch.bincount(labels, minlength=num_classes)
        keep = torch.clamp(torch.round(old_fraction * counts.double()).long(), min=1)
        old_mask = torch.zeros(labels.numel(), dtype=torch.bool)
        old_mask[by_class] = rank < keep[labels[by_class]]
    else:
        raise DataError(f"unknown allocation {kind!r}; use extended-class or extended-data")
    return Allocation(
        kind=kind,
        old_fraction=old_fraction,
        seed=seed,
        num_classes=num_classes,
        num_samples=int(labels.numel()),
        old_classes=tuple(int(c) for c in old_classes),
        old_indices=torch.nonzero(old_mask).flatten(),
    )


def save_allocation(allocation: Allocation, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(allocation.to_json()))
    tmp.replace(path)


def load_allocation(path: Path) -> Allocation:
    try:
        return Allocation.from_json(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"cannot read allocation file {path}: {exc}") from exc


def load_or_make_allocation(
    path: Path, labels: torch.Tensor, num_classes: int, kind: AllocationKind, old_fraction: float, seed: int
) -> Allocation:
    """Reuse the saved split when it matches the request; refuse a saved split made for other data."""
    if path.is_file():
        saved = load_allocation(path)
        wanted = (kind, old_fraction, seed, num_classes, int(labels.numel()))
        have = (saved.kind, saved.old_fraction, saved.seed, saved.num_classes, saved.num_samples)
        if wanted != have:
            raise DataError(
                f"allocation file {path} was made for (kind, fraction, seed, classes, samples)={have}, "
                f"but this run asks for {wanted}; use another run folder or delete the file"
            )
        return saved
    allocation = make_allocation(labels, num_classes, kind, old_fraction, seed)
    save_allocation(allocation, path)
    return allocation

"""Old/new training-set allocations, seeded and saved beside the run.

Every method in a comparison must train on the same split, so the allocation is a file (JSON, human-readable)
that later runs load instead of re-deriving it from a seed that a library upgrade could silently change.
The new model sees the whole training pool and the old set is a subset of it by construction. A labelled
validation split (a seeded number of images per class) can be carved out first: no model trains on it, and
compatibility gates and recipe choices look at it instead of the test split that the final table reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from advbct.config import AllocationKind
from advbct.data.images import DataError


@dataclass(frozen=True)
class Allocation:
    """Which training images each model sees: ``old_indices`` for the old model, everything outside
    ``validation_indices`` for the new ones. The request (kind, fraction, seed, sizes) is kept with the result, so
    a saved file can be checked against a later run's request."""

    kind: AllocationKind
    old_fraction: float
    seed: int
    num_classes: int
    num_samples: int
    old_classes: tuple[int, ...]
    old_indices: torch.Tensor
    validation_per_class: int = 0
    validation_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))

    @property
    def new_indices(self) -> torch.Tensor:
        """Every training image outside the validation split."""
        pool = torch.ones(self.num_samples, dtype=torch.bool)
        pool[self.validation_indices] = False
        return torch.nonzero(pool).flatten()

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "old_fraction": self.old_fraction,
            "seed": self.seed,
            "num_classes": self.num_classes,
            "num_samples": self.num_samples,
            "old_classes": list(self.old_classes),
            "old_indices": self.old_indices.tolist(),
            "validation_per_class": self.validation_per_class,
            "validation_indices": self.validation_indices.tolist(),
        }

    def summary(self) -> dict:
        """Everything except the index list, for checkpoint metadata."""
        out = self.to_json()
        out.pop("old_indices")
        out.pop("validation_indices")
        out["num_old_samples"] = int(self.old_indices.numel())
        out["num_validation_samples"] = int(self.validation_indices.numel())
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
            validation_per_class=int(tree.get("validation_per_class", 0)),
            validation_indices=torch.as_tensor(tree.get("validation_indices", []), dtype=torch.int64),
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
    labels: torch.Tensor,
    num_classes: int,
    kind: AllocationKind,
    old_fraction: float,
    seed: int,
    validation_per_class: int = 0,
) -> Allocation:
    """extended-class: a seeded ``old_fraction`` of the classes, all their training images.
    extended-data: ``round(old_fraction * n_c)`` seeded training images of every class c (at least one).

    ``validation_per_class`` seeded images of every class are set aside first and belong to neither model; the
    old and new sets are drawn from what is left."""
    gen = torch.Generator().manual_seed(seed)
    labels = labels.to(torch.int64).cpu()
    validation = _validation_indices(labels, num_classes, validation_per_class, gen)
    pool = torch.ones(labels.numel(), dtype=torch.bool)
    pool[validation] = False
    pool_indices = torch.nonzero(pool).flatten()
    pool_labels = labels[pool_indices]
    if kind == "extended-class":
        n_old = max(1, round(old_fraction * num_classes))
        old_classes = torch.randperm(num_classes, generator=gen)[:n_old].sort().values
        old_indices = pool_indices[torch.isin(pool_labels, old_classes)]
    elif kind == "extended-data":
        old_classes = torch.arange(num_classes)
        by_class, rank = random_rank_within_class(pool_labels, num_classes, gen)
        counts = torch.bincount(pool_labels, minlength=num_classes)
        keep = torch.clamp(torch.round(old_fraction * counts.double()).long(), min=1)
        old_indices = pool_indices[by_class[rank < keep[pool_labels[by_class]]]].sort().values
    else:
        raise DataError(f"unknown allocation {kind!r}; use extended-class or extended-data")
    return Allocation(
        kind=kind,
        old_fraction=old_fraction,
        seed=seed,
        num_classes=num_classes,
        num_samples=int(labels.numel()),
        old_classes=tuple(int(c) for c in old_classes),
        old_indices=old_indices,
        validation_per_class=validation_per_class,
        validation_indices=validation,
    )


def _validation_indices(
    labels: torch.Tensor, num_classes: int, per_class: int, generator: torch.Generator
) -> torch.Tensor:
    """Sorted indices of ``per_class`` seeded images of every class; refused when a class would keep none to
    train on. Nothing is drawn from ``generator`` when ``per_class`` is 0, so such splits equal those made
    without a validation split."""
    if per_class == 0:
        return torch.empty(0, dtype=torch.int64)
    counts = torch.bincount(labels, minlength=num_classes)
    if int(counts.min()) <= per_class:
        smallest = int(counts.argmin())
        raise DataError(
            f"a validation split of {per_class} images per class leaves class {smallest} "
            f"({int(counts[smallest])} training images) nothing to train on"
        )
    by_class, rank = random_rank_within_class(labels, num_classes, generator)
    return by_class[rank < per_class].sort().values


def save_allocation(allocation: Allocation, path: Path) -> None:
    """Written to a temporary file and renamed, so a reader never sees half a split."""
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
    path: Path,
    labels: torch.Tensor,
    num_classes: int,
    kind: AllocationKind,
    old_fraction: float,
    seed: int,
    validation_per_class: int = 0,
) -> Allocation:
    """Reuse the saved split when it matches the request; refuse a saved split made for other data."""
    if path.is_file():
        saved = load_allocation(path)
        wanted = (kind, old_fraction, seed, num_classes, int(labels.numel()), validation_per_class)
        have = (saved.kind, saved.old_fraction, saved.seed, saved.num_classes, saved.num_samples,
                saved.validation_per_class)  # fmt: skip
        if wanted != have:
            raise DataError(
                f"allocation file {path} was made for (kind, fraction, seed, classes, samples, validation per "
                f"class)={have}, but this run asks for {wanted}; use another run folder or delete the file"
            )
        return saved
    allocation = make_allocation(labels, num_classes, kind, old_fraction, seed, validation_per_class)
    save_allocation(allocation, path)
    return allocation

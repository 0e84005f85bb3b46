"""Old-model class statistics: centres and IQR-filtered radii in the old embedding space.

Computed once per old checkpoint and saved keyed to its ``model_id``. All per-class work (means, quartiles,
outlier filtering, maxima) is done for every class at once on sorted tensors, so it scales to GLDv2's 81k classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from advbct.errors import AdvbctError
from advbct.models.checkpoint import atomic_save

MIN_SAMPLES_FOR_IQR = 4


class StatisticsError(AdvbctError):
    """A statistics file is missing, unreadable, or belongs to another checkpoint."""


@dataclass(frozen=True)
class ClassStatistics:
    """Per class y: centre c_y (mean of normalised embeddings), r_max(y) (Euclidean, to c_y), the angular
    radius theta_max(y) (angle to c_y's direction, same IQR rule; used by LCE), sample count, usable-radius flag.

    ``min_radii`` and ``median_radii`` are the smallest and the median of the same IQR inlier distances: the
    fixed-radius ablation offers them besides r_max, the smallest being the public AdvBCT code's choice.
    """

    centres: torch.Tensor
    radii: torch.Tensor
    min_radii: torch.Tensor
    median_radii: torch.Tensor
    angular_radii: torch.Tensor
    counts: torch.Tensor
    has_radius: torch.Tensor
    old_model_id: str
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return int(self.centres.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centres.shape[1])


@dataclass(frozen=True)
class RadiusSummary:
    """How r_max spreads over the classes that have a radius, and how many lie above AdvBCT's tau.

    Where r_max > tau the elastic radius can only shrink from r_max toward tau; where r_max < tau it can only
    grow. A weak old model's classes are loose (r_max near or above 1 on the unit sphere), so with the paper's
    tau = 1.0 the boundary is fixed near r_max: this summary is how a user sees that before training.
    """

    classes: int
    minimum: float
    median: float
    maximum: float
    above_tau: int
    tau: float

    def describe(self) -> str:
        return (
            f"r_max over {self.classes} classes: min {self.minimum:.3f}, median {self.median:.3f}, "
            f"max {self.maximum:.3f}; {self.above_tau} above tau = {self.tau:g}, where AdvBCT's elastic radius "
            "lies between tau and r_max"
        )


def radius_summary(stats: ClassStatistics, tau: float) -> RadiusSummary:
    """The summary over the classes that have a radius; statistics without any are refused."""
    radii = stats.radii[stats.has_radius].double()
    if radii.numel() == 0:
        raise StatisticsError("no class has a radius (every old class has fewer than 2 samples)")
    return RadiusSummary(
        classes=int(radii.numel()),
        minimum=float(radii.min()),
        median=float(torch.quantile(radii, 0.5)),
        maximum=float(radii.max()),
        above_tau=int((radii > tau).sum()),
        tau=tau,
    )


def _per_class_quantile(
    sorted_values: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, q: float
) -> torch.Tensor:
    """Linear-interpolation quantile (numpy's default) of each class's run in a class-sorted vector."""
    pos = q * (counts - 1).clamp(min=0).to(sorted_values.dtype)
    lo, hi = pos.floor().long(), pos.ceil().long()
    last = sorted_values.numel() - 1
    lo_val = sorted_values[(starts + lo).clamp(max=last)]
    hi_val = sorted_values[(starts + hi).clamp(max=last)]
    return lo_val + (hi_val - lo_val) * (pos - lo)


@dataclass(frozen=True)
class InlierRadii:
    """Per class: the smallest, the median and the largest distance kept by the 1.5-IQR rule (0 without samples)."""

    minimum: torch.Tensor
    median: torch.Tensor
    maximum: torch.Tensor


def iqr_inlier_radii(dist: torch.Tensor, labels: torch.Tensor, num_classes: int) -> InlierRadii:
    """Per class: min, median and max of the distances inside [Q1 - 1.5 IQR, Q3 + 1.5 IQR] (no filtering below 4
    samples). Classes without samples get 0. Quartiles and the median interpolate linearly, as numpy's default
    percentile does, so every statistic is read off one class-then-distance sort of all samples.
    """
    labels = labels.long()
    counts = torch.bincount(labels, minlength=num_classes)
    by_dist = torch.argsort(dist)
    order = by_dist[torch.sort(labels[by_dist], stable=True).indices]
    starts = torch.cumsum(counts, 0) - counts
    q1 = _per_class_quantile(dist[order], starts, counts, 0.25)
    q3 = _per_class_quantile(dist[order], starts, counts, 0.75)
    iqr = q3 - q1
    filtered = counts[labels] >= MIN_SAMPLES_FOR_IQR
    inlier = ~filtered | ((dist >= (q1 - 1.5 * iqr)[labels]) & (dist <= (q3 + 1.5 * iqr)[labels]))
    # Dropping outliers from the sorted order keeps it sorted by class, then by distance.
    kept = order[inlier[order]]
    kept_counts = torch.bincount(labels[kept], minlength=num_classes)
    kept_starts = torch.cumsum(kept_counts, 0) - kept_counts
    sorted_kept = dist[kept]
    median = _per_class_quantile(sorted_kept, kept_starts, kept_counts, 0.5)
    first = sorted_kept[kept_starts.clamp(max=sorted_kept.numel() - 1)]
    present = kept_counts > 0
    zeros = torch.zeros(num_classes, dtype=dist.dtype)
    return InlierRadii(
        minimum=torch.where(present, first, zeros),
        median=torch.where(present, median, zeros),
        maximum=zeros.scatter_reduce(0, labels[kept], sorted_kept, reduce="amax", include_self=False),
    )


def iqr_max_radius(dist: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per class: the largest distance inside [Q1 - 1.5 IQR, Q3 + 1.5 IQR] (no filtering below 4 samples)."""
    return iqr_inlier_radii(dist, labels, num_classes).maximum


def _check_statistics_input(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """Refuse inputs that would otherwise fail deep inside the computation or, worse, give silently wrong centres
    (a label past ``num_classes`` would lengthen the class counts)."""
    if embeddings.ndim != 2 or labels.ndim != 1:
        raise ValueError(
            f"class statistics need embeddings of shape (N, D) and labels of shape (N,), "
            f"got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(f"class statistics got {embeddings.shape[0]} embeddings but {labels.shape[0]} labels")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"class statistics: labels must lie in 0..{num_classes - 1}, found {int(labels.min())}..{int(labels.max())}"
        )


def compute_class_statistics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    old_model_id: str = "",
    class_names: tuple[str, ...] = (),
) -> ClassStatistics:
    """Centres, radii (min, median and max distance after dropping 1.5-IQR outliers for classes with >= 4 samples)
    and counts."""
    _check_statistics_input(embeddings, labels, num_classes)
    feats = F.normalize(embeddings.double(), dim=1)
    labels = labels.long()
    counts = torch.bincount(labels, minlength=num_classes)
    centres = torch.zeros(num_classes, feats.shape[1], dtype=feats.dtype).index_add_(0, labels, feats)
    centres /= counts.clamp(min=1).unsqueeze(1)
    dist = (feats - centres[labels]).norm(dim=1)
    cos = (feats * F.normalize(centres, dim=1)[labels]).sum(1)
    angles = torch.acos(cos.clamp(-1.0, 1.0))
    radii = iqr_inlier_radii(dist, labels, num_classes)
    return ClassStatistics(
        centres=centres.float(),
        radii=radii.maximum.float(),
        min_radii=radii.minimum.float(),
        median_radii=radii.median.float(),
        angular_radii=iqr_max_radius(angles, labels, num_classes).float(),
        counts=counts,
        has_radius=counts >= 2,
        old_model_id=old_model_id,
        class_names=tuple(class_names),
    )


_TENSOR_FIELDS = ("centres", "radii", "min_radii", "median_radii", "angular_radii", "counts", "has_radius")


def save_statistics(stats: ClassStatistics, path: Path) -> None:
    """Write ``stats`` atomically as tensors and a JSON string, the only things :func:`load_statistics` reads back."""
    meta = {"old_model_id": stats.old_model_id, "class_names": list(stats.class_names)}
    atomic_save(
        {"meta": json.dumps(meta), **{name: getattr(stats, name) for name in _TENSOR_FIELDS}},
        Path(path),
    )


def load_statistics(path: str | Path, expected_model_id: str | None = None) -> ClassStatistics:
    """Read a statistics file; refuse it when it was computed from a different old checkpoint.

    Only tensors and a JSON string are read back (``weights_only``): a statistics file may come from anywhere, and
    unpickling arbitrary objects would run code from it.
    """
    path = Path(path)
    if not path.is_file():
        raise StatisticsError(f"statistics file not found: {path} (run `advbct stats` on the old checkpoint)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StatisticsError(f"cannot read statistics file {path}: {exc}") from exc
    missing = [name for name in ("meta", *_TENSOR_FIELDS) if not isinstance(blob, dict) or name not in blob]
    if missing:
        raise StatisticsError(
            f"statistics file {path} lacks {', '.join(missing)} (written by an older version or not a statistics "
            "file); re-run `advbct stats` on the old checkpoint"
        )
    try:
        meta = json.loads(blob["meta"])
        stats = ClassStatistics(
            **{name: blob[name] for name in _TENSOR_FIELDS},
            old_model_id=str(meta["old_model_id"]),
            class_names=tuple(meta["class_names"]),
        )
    except Exception as exc:
        raise StatisticsError(f"cannot read statistics file {path}: {exc}") from exc
    if expected_model_id is not None and stats.old_model_id != expected_model_id:
        raise StatisticsError(
            f"statistics file {path} was computed from old model {stats.old_model_id}, "
            f"but the old checkpoint given is {expected_model_id}; run `advbct stats` on that checkpoint"
        )
    return stats

"""The backfill curve: retrieval quality while a gallery is re-embedded behind a new query model.

After an upgrade the new model answers queries at once, against a gallery that the old model embedded; a
backfill then re-embeds the items one batch at a time. At every moment the gallery is mixed: a fraction t of its
items holds new embeddings, the rest old ones. The curve scores the new query model against that mixed gallery
for t = 0, 0.1, ..., 1, items re-embedded in a seeded random order (the partial-refresh protocol of the public
AdvBCT code and of FastFill). t = 0 is the cross test M(n,o), t = 1 the self test M(n,n). Its mean over the
fractions (the area under the curve) and its lowest point, against M(o,o), say whether users ever see worse
results than before the upgrade.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from advbct.evaluation.metrics import label_retrieval_metrics

DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))


@dataclass(frozen=True)
class BackfillCurve:
    """mAP and top-1 (percent) of the new query model at each re-embedded fraction of the gallery."""

    fractions: tuple[float, ...]
    map: tuple[float, ...]
    top1: tuple[float, ...]

    @property
    def auc_map(self) -> float:
        """The mean mAP over the fractions: with evenly spaced fractions, the area under the curve."""
        return sum(self.map) / len(self.map)

    @property
    def min_map(self) -> float:
        return min(self.map)

    def to_json(self) -> dict:
        return {**asdict(self), "auc_map": self.auc_map, "min_map": self.min_map}


def backfill_order(num_items: int, seed: int) -> torch.Tensor:
    """The seeded random order in which gallery items are re-embedded (positions into the gallery)."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))


def refreshed_count(num_items: int, fraction: float) -> int:
    """Items re-embedded at ``fraction`` of the backfill (rounded to the nearest item)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"a backfill fraction lies in [0, 1], got {fraction}")
    return round(fraction * num_items)


def mixed_gallery(old: torch.Tensor, new: torch.Tensor, order: torch.Tensor, fraction: float) -> torch.Tensor:
    """The gallery when the first ``fraction`` of ``order`` has been re-embedded: those rows from ``new``, the
    others from ``old``."""
    if old.shape != new.shape:
        raise ValueError(f"old gallery embeddings {tuple(old.shape)} and new ones {tuple(new.shape)} differ")
    if order.shape != (old.shape[0],):
        raise ValueError(f"the order must hold each of the {old.shape[0]} gallery items once")
    refreshed = torch.zeros(old.shape[0], dtype=torch.bool)
    refreshed[order[: refreshed_count(old.shape[0], fraction)]] = True
    return torch.where(refreshed.unsqueeze(1), new, old)


def backfill_curve(
    queries: torch.Tensor,
    old_gallery: torch.Tensor,
    new_gallery: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    query_items: torch.Tensor | None = None,
) -> BackfillCurve:
    """Exact scores of ``queries`` (new-model embeddings of gallery images) against the mixed gallery at each
    fraction; every query is one of the gallery's own images and is left out of its own ranking.

    ``query_items``: the gallery positions of the queries (default: all of them, in order), for a probe of a few.
    """
    query_items = torch.arange(old_gallery.shape[0]) if query_items is None else query_items
    if queries.shape[0] != query_items.shape[0]:
        raise ValueError(f"{queries.shape[0]} queries for {query_items.shape[0]} query items")
    maps, top1s = [], []
    for fraction in fractions:
        gallery = mixed_gallery(old_gallery, new_gallery, order, fraction)
        scores = label_retrieval_metrics(
            queries, labels[query_items], gallery, labels, ks=(1,), own_gallery_index=query_items
        )
        maps.append(scores["map"])
        top1s.append(scores["top1"])
    return BackfillCurve(tuple(fractions), tuple(maps), tuple(top1s))

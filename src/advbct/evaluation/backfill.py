"""The backfill curve: retrieval quality while a gallery is re-embedded behind a new query model.

After an upgrade the new model answers queries at once, against a gallery that the old model embedded; a
backfill then re-embeds the items one batch at a time. At every moment the gallery is mixed: a fraction t of its
items holds new embeddings, the rest old ones. The curve scores the new query model against that mixed gallery
for t = 0, 0.1, ..., 1 (the partial-refresh protocol of the public AdvBCT code and of FastFill). t = 0 is the cross
test M(n,o), t = 1 the self test M(n,n). Its mean over the fractions (the area under the curve), its lowest point
against M(o,o) and its negative flips (queries the old system answered right at top-1 and the mixed one gets
wrong) say whether users ever see worse results than before the upgrade.

Two choices shape the curve, and both are parameters here so that they can be compared:

- **the order** in which items are re-embedded (``ORDER_POLICIES``: random, the old classifier's uncertainty,
  distance from the old class centres, or the oracle that knows the new embeddings);
- **the merge** of the two parts of a mixed gallery: raw cosine, or each part's cosine mapped to the log-odds that
  the item is relevant (Platt scaling fitted on the validation split, per gallery part). Raw cosine ranks by
  generation rather than relevance whenever new-to-new similarities run higher than new-to-old ones, which they
  do for any model that is better than its predecessor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from advbct.evaluation.metrics import QueryScores, check_finite, scores_from_similarity

DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))
MERGES = ("raw", "calibrated")


@dataclass(frozen=True)
class BackfillCurve:
    """The new query model's scores (percent) at each re-embedded fraction of the gallery. ``negative_flips``:
    the share of scored queries whose top-1 was right with the old model on the old gallery and is wrong here
    (empty where no baseline was given)."""

    fractions: tuple[float, ...]
    map: tuple[float, ...]
    top1: tuple[float, ...]
    negative_flips: tuple[float, ...]
    order: str = "random"
    merge: str = "raw"

    @property
    def auc_map(self) -> float:
        """The mean mAP over the fractions: with evenly spaced fractions, the area under the curve."""
        return sum(self.map) / len(self.map)

    @property
    def auc_top1(self) -> float:
        return sum(self.top1) / len(self.top1)

    @property
    def min_map(self) -> float:
        return min(self.map)

    @property
    def max_negative_flips(self) -> float | None:
        return max(self.negative_flips) if self.negative_flips else None

    def to_json(self) -> dict:
        derived = ("auc_map", "auc_top1", "min_map", "max_negative_flips")
        return {**asdict(self), **{name: getattr(self, name) for name in derived}}


@dataclass(frozen=True)
class PlattScaling:
    """log-odds(relevant | cosine s) = scale * s + bias, for one (query model, gallery model) pair."""

    scale: float
    bias: float

    def logits(self, similarity: torch.Tensor) -> torch.Tensor:
        return self.scale * similarity + self.bias


@dataclass(frozen=True)
class ScoreCalibration:
    """How the active query model's cosine reads against each part of a mixed gallery: ``same`` for items its own
    model embedded, ``cross`` for items the previous model embedded."""

    same: PlattScaling
    cross: PlattScaling

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, blob: dict) -> ScoreCalibration:
        return cls(PlattScaling(**blob["same"]), PlattScaling(**blob["cross"]))


# ---------------------------------------------------------------------------------------------------------------
# Order policies


@dataclass(frozen=True)
class GalleryState:
    """What a gallery holds when its backfill starts, as an order policy sees it: the old model's embedding of every
    item (as the old model outputs it), and what the old checkpoint brings for free (its classifier, embeddings to
    logits; its class centres). ``new`` is the new model's embedding of every item, known only offline (the
    oracle's)."""

    old: torch.Tensor
    seed: int = 0
    old_classifier: Callable[[torch.Tensor], torch.Tensor] | None = None
    old_centres: torch.Tensor | None = None
    new: torch.Tensor | None = None


OrderPolicy = Callable[[GalleryState], torch.Tensor]
ORDER_POLICIES: dict[str, OrderPolicy] = {}


def register_order(name: str) -> Callable[[OrderPolicy], OrderPolicy]:
    """Add the decorated function to ``ORDER_POLICIES`` as ``name``."""

    def add(policy: OrderPolicy) -> OrderPolicy:
        ORDER_POLICIES[name] = policy
        return policy

    return add


def backfill_order(policy: str, state: GalleryState) -> torch.Tensor:
    """Gallery positions in the order the backfill re-embeds them, by the named policy."""
    if policy not in ORDER_POLICIES:
        raise ValueError(f"unknown backfill order {policy!r}; choose one of {', '.join(ORDER_POLICIES)}")
    return ORDER_POLICIES[policy](state)


def _highest_first(priority: torch.Tensor) -> torch.Tensor:
    """Positions by descending priority; equal priorities keep gallery order, so an order never depends on the
    sort's implementation."""
    return torch.sort(priority.double(), descending=True, stable=True).indices


def _required(value: torch.Tensor | None, policy: str, what: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"the {policy!r} backfill order needs {what}")
    return value


@register_order("random")
def random_order(state: GalleryState) -> torch.Tensor:
    """The field's reference protocol: a seeded random order."""
    return torch.randperm(state.old.shape[0], generator=torch.Generator().manual_seed(state.seed))


@register_order("uncertainty")
def uncertainty_order(state: GalleryState) -> torch.Tensor:
    """Items whose old embedding the old classifier is least sure of (highest softmax entropy) first: they are the
    ones the old model placed worst, so re-embedding them should help most (Hot-refresh's proposal). Costs
    nothing: the classifier and the stored vectors are already there."""
    if state.old_classifier is None:
        raise ValueError("the 'uncertainty' backfill order needs the old model's classifier")
    with torch.no_grad():
        log_p = torch.log_softmax(state.old_classifier(state.old).float(), dim=1)
    return _highest_first(-(log_p.exp() * log_p).sum(1))


@register_order("centre-distance")
def centre_distance_order(state: GalleryState) -> torch.Tensor:
    """Items farthest from their nearest old class centre first (in the normalised space the centres live in):
    outliers of the old space, where the old embedding is least likely to sit among its own class."""
    centres = _required(state.old_centres, "centre-distance", "the old class centres (advbct stats)")
    distances = torch.cdist(F.normalize(state.old.float(), dim=1), centres.float())
    return _highest_first(distances.min(1).values)


@register_order("oracle")
def oracle_order(state: GalleryState) -> torch.Tensor:
    """Items whose embedding changes most first (an upper bound for evaluation: it needs the new embedding of every
    item, which is what the backfill is computing)."""
    new = _required(state.new, "oracle", "the new embeddings of every item (offline only)")
    return _highest_first((F.normalize(new.float(), dim=1) - F.normalize(state.old.float(), dim=1)).norm(dim=1))


# ---------------------------------------------------------------------------------------------------------------
# Calibration


BINS = 4096  # bins of [-1, 1] that calibration pairs are counted in: a similarity moves by at most 2.5e-4
# The smallest slope a calibration keeps. The map must be increasing, so that merging never reorders a part's own
# ranking; a fit without a positive slope (cosine says nothing about relevance in that part) leaves the part's
# items near the base rate, still in cosine order among themselves.
MIN_SCALE = 1e-3


def _bin(similarity: torch.Tensor) -> torch.Tensor:
    return ((similarity.float().clamp(-1, 1) + 1) * (BINS / 2)).long().clamp(max=BINS - 1)


def fit_platt(similarity: torch.Tensor, relevant: torch.Tensor) -> PlattScaling:
    """Logistic regression of relevance on cosine similarity, for pairs given one by one."""
    index = _bin(similarity).flatten()
    positives = torch.bincount(index[relevant.flatten()], minlength=BINS)
    return fit_binned_platt(positives, torch.bincount(index, minlength=BINS))


def fit_binned_platt(positives: torch.Tensor, totals: torch.Tensor, iterations: int = 25) -> PlattScaling:
    """Logistic regression of relevance on cosine similarity, by Newton's method on the log-likelihood, from the
    relevant and total pair counts in each of ``BINS`` similarity bins: a split of n images costs n^2 additions
    and the fit itself 4,096 weighted points. The slope is kept at ``MIN_SCALE`` or more."""
    positives, totals = positives.double(), totals.double()
    if positives.sum() == 0 or positives.sum() == totals.sum():
        raise ValueError("calibration needs both relevant and irrelevant pairs")
    centre = (torch.arange(BINS, dtype=torch.float64) + 0.5) * (2 / BINS) - 1
    design = torch.stack([centre, torch.ones_like(centre)], dim=1)
    theta = torch.zeros(2, dtype=torch.float64)
    for _ in range(iterations):
        p = torch.sigmoid(design @ theta)
        gradient = design.T @ (totals * p - positives)
        hessian = design.T @ (design * (totals * p * (1 - p)).unsqueeze(1))
        theta = theta - torch.linalg.solve(hessian + 1e-9 * torch.eye(2, dtype=torch.float64), gradient)
    return PlattScaling(max(float(theta[0]), MIN_SCALE), float(theta[1]))


def _pair_counts(
    queries: torch.Tensor, gallery: torch.Tensor, labels: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevant and total pair counts per similarity bin over every (query i, item j != i) pair of a split
    searched against itself, a block of queries at a time (memory bounded by ``chunk`` x split size)."""
    q, g = F.normalize(queries.float(), dim=1), F.normalize(gallery.float(), dim=1)
    positives = torch.zeros(BINS, dtype=torch.long)
    totals = torch.zeros(BINS, dtype=torch.long)
    for start in range(0, q.shape[0], chunk):
        rows = torch.arange(start, min(start + chunk, q.shape[0]))
        index = _bin(q[rows] @ g.T)
        counted = torch.ones_like(index, dtype=torch.bool)
        counted[torch.arange(rows.shape[0]), rows] = False
        relevant = (labels[rows].unsqueeze(1) == labels.unsqueeze(0)) & counted
        positives += torch.bincount(index[relevant], minlength=BINS)
        totals += torch.bincount(index[counted], minlength=BINS)
    return positives, totals


def fit_calibration(
    new_queries: torch.Tensor, new_gallery: torch.Tensor, old_gallery: torch.Tensor, labels: torch.Tensor
) -> ScoreCalibration:
    """Both Platt scalings from a labelled split (the validation split: never the split a curve reports) that
    both models embedded: each image a query (new model) against all the others."""
    check_finite(queries=new_queries, new_gallery=new_gallery, old_gallery=old_gallery)
    return ScoreCalibration(
        same=fit_binned_platt(*_pair_counts(new_queries, new_gallery, labels)),
        cross=fit_binned_platt(*_pair_counts(new_queries, old_gallery, labels)),
    )


# ---------------------------------------------------------------------------------------------------------------
# The curve


def refreshed_count(num_items: int, fraction: float) -> int:
    """Items re-embedded at ``fraction`` of the backfill (rounded to the nearest item)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"a backfill fraction lies in [0, 1], got {fraction}")
    return round(fraction * num_items)


def refreshed_mask(num_items: int, order: torch.Tensor, fraction: float) -> torch.Tensor:
    """Which gallery items hold new embeddings once the first ``fraction`` of ``order`` has been re-embedded."""
    if order.shape != (num_items,) or not torch.equal(torch.sort(order).values, torch.arange(num_items)):
        raise ValueError(f"the order must hold each of the {num_items} gallery items once")
    refreshed = torch.zeros(num_items, dtype=torch.bool)
    refreshed[order[: refreshed_count(num_items, fraction)]] = True
    return refreshed


def mixed_similarity(
    queries: torch.Tensor,
    old_gallery: torch.Tensor,
    new_gallery: torch.Tensor,
    refreshed: torch.Tensor,
    calibration: ScoreCalibration | None = None,
) -> Callable[[int, int], torch.Tensor]:
    """The ranking score of queries ``start:end`` against the mixed gallery: cosine against whichever vector each
    item holds, as raw cosine or (with ``calibration``) as the log-odds of relevance of that item's part."""
    if old_gallery.shape != new_gallery.shape:
        raise ValueError(f"old gallery embeddings {tuple(old_gallery.shape)} and new ones {tuple(new_gallery.shape)}")
    q = F.normalize(queries.float(), dim=1)
    old, new = F.normalize(old_gallery.float(), dim=1), F.normalize(new_gallery.float(), dim=1)

    cross, same = (None, None) if calibration is None else _centred(calibration)

    def block(start: int, end: int) -> torch.Tensor:
        to_old, to_new = q[start:end] @ old.T, q[start:end] @ new.T
        if cross is not None and same is not None:
            to_old, to_new = cross.logits(to_old), same.logits(to_new)
        return torch.where(refreshed.unsqueeze(0), to_new, to_old)

    return block


def _centred(calibration: ScoreCalibration) -> tuple[PlattScaling, PlattScaling]:
    """Both maps less the bias of the shallower one: the same ranking (one constant moves every score), with the
    shallow part's scores near zero, where float32 still tells apart the cosines a slope of 1e-3 separates; a bias
    of a few units would round them to equal scores."""
    shift = min((calibration.cross, calibration.same), key=lambda m: m.scale).bias
    return (
        PlattScaling(calibration.cross.scale, calibration.cross.bias - shift),
        PlattScaling(calibration.same.scale, calibration.same.bias - shift),
    )


def negative_flip_rate(before: QueryScores, after: QueryScores) -> float:
    """Percent of the scored queries whose top-1 was right ``before`` and is wrong ``after``."""
    flipped = before.hits[1] & ~after.hits[1] & after.scored
    return 100.0 * float(flipped.sum()) / max(1, int(after.scored.sum()))


def backfill_curve(
    queries: torch.Tensor,
    old_gallery: torch.Tensor,
    new_gallery: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    query_items: torch.Tensor | None = None,
    baseline: QueryScores | None = None,
    calibration: ScoreCalibration | None = None,
    order_name: str = "random",
) -> BackfillCurve:
    """Exact scores of ``queries`` (new-model embeddings of gallery images) against the mixed gallery at each
    fraction; every query is one of the gallery's own images and is left out of its own ranking.

    ``query_items``: the gallery positions of the queries (default: all of them, in order), for a probe of a few.
    ``baseline``: the old system's per-query scores for the same queries (old queries, old gallery), which the
    negative flips are counted against (none without it). ``calibration``: merge the two parts by calibrated
    score, not cosine.
    """
    query_items = torch.arange(old_gallery.shape[0]) if query_items is None else query_items
    if queries.shape[0] != query_items.shape[0]:
        raise ValueError(f"{queries.shape[0]} queries for {query_items.shape[0]} query items")
    check_finite(queries=queries, old_gallery=old_gallery, new_gallery=new_gallery)
    maps, top1s, flips = [], [], []
    for fraction in fractions:
        refreshed = refreshed_mask(old_gallery.shape[0], order, fraction)
        similarity = mixed_similarity(queries, old_gallery, new_gallery, refreshed, calibration)
        scores = scores_from_similarity(similarity, labels[query_items], labels, (1,), own_gallery_index=query_items)
        means = scores.means()
        maps.append(means["map"])
        top1s.append(means["top1"])
        if baseline is not None:
            flips.append(negative_flip_rate(baseline, scores))
    merge = "raw" if calibration is None else "calibrated"
    return BackfillCurve(tuple(fractions), tuple(maps), tuple(top1s), tuple(flips), order_name, merge)

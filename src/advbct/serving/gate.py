"""The compatibility gate.

A new generation goes live only if, on a labelled validation image folder large enough to decide on, its queries
find the current gallery better than the current model does (M(n,o) > M(o,o)) and it is better on its own
(M(n,n) > M(o,o)), with the same embedding dimension; otherwise it is refused with the measured numbers (and
bootstrap intervals of both margins) and the registry is left untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from advbct.data.images import ImageSet
from advbct.errors import AdvbctError
from advbct.evaluation.backfill import fit_calibration
from advbct.evaluation.metrics import label_retrieval_scores
from advbct.evaluation.protocol import embed_images
from advbct.evaluation.results import CROSS, OLD, SELF, TestResult, compatibility_criterion, pair_name
from advbct.serving.models import Embedder


class GateRefused(AdvbctError):
    """The candidate model failed the compatibility gate; the message holds the numbers."""


@dataclass(frozen=True)
class GatePolicy:
    """How much validation evidence the gate needs, and how it states its uncertainty.

    Minimum: ``min_classes`` classes with at least two images each (a query needs another image of its class to
    be scored at all), and ``min_queries`` scored queries in all. With fewer, one or two lucky queries decide (on a
    handful of images an incompatible model can beat M(o,o) by chance), and a bootstrap over a handful of queries
    understates its own spread. Ten classes keep the mAP a statement about ranking among many classes rather than
    telling two or three apart. Per-query AP differences lie in [-1, 1] and usually spread well under 0.3, so a
    hundred queries put the standard error of the margin at a few mAP points: small beside an incompatible model's
    shortfall, which is what the gate exists to catch.

    Interval: a percentile bootstrap over queries, ``resamples`` draws with replacement (seeded, so the same
    validation set always gives the same interval), of M(n,o) - M(o,o) and M(n,n) - M(o,o), paired (each draw
    takes the same queries in all three tests).
    """

    min_classes: int = 10
    min_queries: int = 100
    resamples: int = 1000
    level: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class Margin:
    """A margin over M(o,o) in mAP points: the mean per-query difference and its bootstrap interval."""

    point: float
    low: float
    high: float

    def to_json(self) -> dict[str, float]:
        return {"point": self.point, "low": self.low, "high": self.high}

    @classmethod
    def from_json(cls, data: Mapping) -> Margin:
        return cls(data["point"], data["low"], data["high"])


@dataclass(frozen=True)
class ValidationSize:
    """Images in the validation set, its scored queries (images with another image of their class) and the
    classes with two or more images."""

    images: int
    queries: int
    classes: int

    def to_json(self) -> dict[str, int]:
        return {"images": self.images, "queries": self.queries, "classes": self.classes}


@dataclass(frozen=True)
class GateEvidence:
    """What a decision rests on beyond the three mAPs: both margins with their intervals, the validation set's
    size and the bootstrap that drew the intervals; ``undecided`` says why the set was too small to decide (None
    when it was not), ``confident`` whether both lower bounds are above zero."""

    cross_margin: Margin
    self_margin: Margin
    validation: ValidationSize
    bootstrap: Mapping[str, float]
    undecided: str | None
    confident: bool

    @classmethod
    def from_json(cls, data: Mapping) -> GateEvidence:
        margins = data["margins"]
        return cls(
            Margin.from_json(margins[CROSS]),
            Margin.from_json(margins[SELF]),
            ValidationSize(**data["validation"]),
            dict(data["bootstrap"]),
            data["undecided"],
            data["confident"],
        )


@dataclass(frozen=True)
class GateResult:
    """The gate's numbers and decision for one candidate, as the registry stores them with its generation.

    ``old``, ``self_test`` and ``cross`` hold M(o,o), M(n,n) and M(n,o) (mAP, percent) on the validation set.
    ``evidence`` and ``calibration`` are None in records that hold only the three mAPs and the decision (such
    registries still load). ``forced`` is None until a registration records whether the operator overrode a
    refusal; ``forced_by`` and ``reason`` name who did and why.
    """

    old: TestResult
    self_test: TestResult
    cross: TestResult
    passed: bool
    evidence: GateEvidence | None = None
    calibration: dict | None = None
    forced: bool | None = None
    forced_by: str | None = None
    reason: str | None = None

    @property
    def decided(self) -> bool:
        """The validation set was large enough to decide on."""
        return self.evidence is None or self.evidence.undecided is None

    def to_json(self) -> dict:
        """The JSON the registry stores and the API and the CLI return, keys in their stored order."""
        data: dict = {OLD: self.old.map, SELF: self.self_test.map, CROSS: self.cross.map}
        evidence = self.evidence
        if evidence is not None:
            data["margins"] = {CROSS: evidence.cross_margin.to_json(), SELF: evidence.self_margin.to_json()}
            data["validation"] = evidence.validation.to_json()
            data["bootstrap"] = dict(evidence.bootstrap)
            data["decided"], data["undecided"] = self.decided, evidence.undecided
        data["passed"] = self.passed
        if evidence is not None:
            data["confident"] = evidence.confident
        if evidence is not None or self.calibration is not None:  # searches rank by it: never dropped on a save
            data["calibration"] = self.calibration
        if self.forced is not None:
            data["forced"] = self.forced
        if self.forced:
            data["forced_by"], data["reason"] = self.forced_by, self.reason
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> GateResult:
        tests = {test: TestResult({"map": data[test]}) for test in (OLD, SELF, CROSS)}
        evidence = GateEvidence.from_json(data) if "margins" in data else None
        return cls(
            tests[OLD],
            tests[SELF],
            tests[CROSS],
            data["passed"],
            evidence,
            data.get("calibration"),
            data.get("forced"),
            data.get("forced_by"),
            data.get("reason"),
        )


def compatibility_gate(
    old: Embedder, new: Embedder, validation: ImageSet, policy: GatePolicy | None = None
) -> GateResult:
    """M(o,o), M(n,n), M(n,o) (mAP, percent) on the validation images, their margins over M(o,o) with bootstrap
    intervals, and whether the upgrade is allowed.

    Pass rule: the validation set meets the minimum, and both margins are above zero (the compatibility
    criterion as stated, on the point estimates). The intervals are reported with the decision, and
    ``confident`` says whether both lower bounds are above zero too. Requiring that for a pass would refuse a
    model that is truly better whenever the validation set is too small to resolve its margin, and compatible
    upgrades often win on M(n,o) by a point or less; the minimum size keeps chance passes of incompatible models
    out, and the interval shows the operator how close the call was.
    Below the minimum the numbers are still measured (a forced upgrade records them) but nothing passes:
    ``decided`` is False and ``undecided`` names the size.
    """
    policy = policy or GatePolicy()
    if new.dim != old.dim:
        raise GateRefused(f"the candidate embeds to {new.dim} dimensions, the gallery holds {old.dim}")
    size = validation_size(validation.labels)
    too_small = _too_small(size, policy)
    if size.queries == 0:
        raise GateRefused(f"the gate cannot measure anything: {too_small}")
    embeddings = {
        "old": embed_images(old.model, validation.images, old.prep, old.device),
        "new": embed_images(new.model, validation.images, new.prep, new.device),
    }
    scores = {
        pair_name(q, g): label_retrieval_scores(
            embeddings[q], validation.labels, embeddings[g], validation.labels, True
        )
        for q, g in (("old", "old"), ("new", "new"), ("new", "old"))
    }
    scored = scores[OLD].scored
    ap = {test: 100.0 * s.ap[scored] for test, s in scores.items()}
    differences = torch.stack([ap[CROSS] - ap[OLD], ap[SELF] - ap[OLD]])
    bounds = bootstrap_interval(differences, policy.resamples, policy.level, policy.seed)
    cross, self_margin = (
        Margin(float(row.mean()), float(low), float(high))
        for row, (low, high) in zip(differences, bounds.tolist(), strict=True)
    )
    on_points = compatibility_criterion(cross.point, self_margin.point)
    on_lower_bounds = compatibility_criterion(cross.low, self_margin.low)
    bootstrap = {"resamples": policy.resamples, "level": policy.level, "seed": policy.seed}
    evidence = GateEvidence(
        cross, self_margin, size, bootstrap, too_small, too_small is None and on_lower_bounds.upgrade_ok
    )
    tests = {test: TestResult({"map": float(values.mean())}) for test, values in ap.items()}
    passed = too_small is None and on_points.upgrade_ok
    calibration = gallery_calibration(embeddings, validation.labels)
    return GateResult(tests[OLD], tests[SELF], tests[CROSS], passed, evidence, calibration)


def gallery_calibration(embeddings: dict[str, torch.Tensor], labels: torch.Tensor) -> dict | None:
    """The score calibration searches use while the candidate's gallery is mixed, fitted on the gate's
    validation embeddings; none (plain cosine) where the split holds no pair of one class."""
    try:
        return fit_calibration(embeddings["new"], embeddings["new"], embeddings["old"], labels).to_json()
    except ValueError:
        return None


def validation_size(labels: torch.Tensor) -> ValidationSize:
    """Scored queries (images with another image of their class) and the classes with two or more images."""
    per_class = torch.bincount(labels.long()) if labels.numel() else torch.zeros(0, dtype=torch.long)
    usable = per_class[per_class >= 2]
    return ValidationSize(int(labels.numel()), int(usable.sum()), int(usable.numel()))


def _too_small(size: ValidationSize, policy: GatePolicy) -> str | None:
    """Why ``size`` is below the policy's minimum, naming both; None when it is not."""
    if size.classes >= policy.min_classes and size.queries >= policy.min_queries:
        return None
    return (
        f"the validation set is too small to decide: {size.queries} scored queries in {size.classes} classes "
        f"with 2+ images ({size.images} images); the gate needs at least {policy.min_queries} queries in "
        f"{policy.min_classes} such classes"
    )


def bootstrap_interval(values: torch.Tensor, resamples: int, level: float, seed: int) -> torch.Tensor:
    """Percentile bootstrap intervals of the mean of each row of ``values`` (R, Q) over its Q columns:
    (R, 2) of (low, high) at ``level``.

    Every row is resampled with the same column draws (a paired bootstrap: the columns are queries, the rows
    differences measured on them). The draws are one index tensor per block of resamples, the block sized to keep
    it near 4 million indices whatever the number of queries.
    """
    if values.ndim != 2 or values.shape[1] == 0:
        raise ValueError(f"bootstrap needs (rows, queries) with at least one query, got {tuple(values.shape)}")
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap needs resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    generator = torch.Generator().manual_seed(seed)
    values = values.to(torch.float64).cpu()
    queries = values.shape[1]
    block = max(1, 4_000_000 // queries)
    means = []
    for start in range(0, resamples, block):
        draws = torch.randint(queries, (min(block, resamples - start), queries), generator=generator)
        means.append(values[:, draws].mean(dim=2))
    tail = (1.0 - level) / 2
    quantiles = torch.tensor([tail, 1.0 - tail], dtype=torch.float64)
    return torch.quantile(torch.cat(means, dim=1), quantiles, dim=1).T


def describe_gate(result: GateResult) -> str:
    """The gate's decision in one line, with the numbers and intervals it was made on."""
    line = f"M(n,o) {result.cross.map:.2f}, M(n,n) {result.self_test.map:.2f}, M(o,o) {result.old.map:.2f}"
    evidence = result.evidence
    if evidence is not None:
        level = round(100 * evidence.bootstrap["level"])
        spans = [
            f"{name} {m.point:+.2f} [{m.low:+.2f}, {m.high:+.2f}]"
            for name, m in (("M(n,o)", evidence.cross_margin), ("M(n,n)", evidence.self_margin))
        ]
        line += f"; over M(o,o): {', '.join(spans)} ({level}% bootstrap over {evidence.validation.queries} queries)"
        if evidence.undecided:
            return f"{evidence.undecided}; measured {line}"
    return line + " (both must exceed M(o,o))"

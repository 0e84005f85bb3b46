"""Typed evaluation results: one test, one upgrade's five tests with its scores, and the compatibility criterion.

Every consumer (the CLI's eval, the quickstart, ``advbct compare``, the bench, the serving gate, the landmark
table, the markdown reports) reads these rather than string-keyed dicts, and the JSON files are written from
them. The JSON keeps the ``"query/gallery"`` test names ("old/old", "new/old", ...) that run folders already
hold, so reports render the same from old and new runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from advbct.evaluation.compatibility import compatibility_scores


def pair_name(query: str, gallery: str) -> str:
    """The name of the test whose queries ``query`` embeds and whose gallery ``gallery`` embeds."""
    return f"{query}/{gallery}"


# The paper's five tests as (query model, gallery model), in the order reports list them: M(o,o), M(n,n), M(n,o),
# M(*,*), M(*,o). The first three need no independent model.
UPGRADE_PAIRS = (("old", "old"), ("new", "new"), ("new", "old"), ("independent", "independent"), ("independent", "old"))
# Their names in results.json.
OLD, SELF, CROSS, INDEPENDENT, INDEPENDENT_CROSS = UPGRADE_TESTS = tuple(pair_name(*p) for p in UPGRADE_PAIRS)
# The tests every method of a comparison shares (one old and one independent model serve them all).
SHARED_PAIRS = (UPGRADE_PAIRS[0], *UPGRADE_PAIRS[3:])


@dataclass(frozen=True)
class Criterion:
    """The compatibility criterion: the new model's queries find the old gallery better than the old model does
    (M(n,o) > M(o,o), ``cross``), and the new model is better on its own (M(n,n) > M(o,o), ``self_test``)."""

    cross: bool
    self_test: bool

    @property
    def upgrade_ok(self) -> bool:
        """Both hold: the upgrade may go live before any backfill."""
        return self.cross and self.self_test


def compatibility_criterion(cross_margin: float, self_margin: float) -> Criterion:
    """The criterion on the margins over M(o,o): M(n,o) - M(o,o) and M(n,n) - M(o,o). Stated on margins so that
    the gate's mean per-query differences and a report's mAP differences are judged by the same rule."""
    return Criterion(cross=cross_margin > 0, self_test=self_margin > 0)


@dataclass(frozen=True)
class TestResult:
    """One (query model, gallery model) test: metric name -> value in percent (map, map_at_r, top1, top5 on
    labelled sets)."""

    __test__ = False  # a result, not a pytest test class
    metrics: Mapping[str, float]

    @property
    def map(self) -> float:
        return self.metrics["map"]

    def to_json(self) -> dict[str, float]:
        return dict(self.metrics)


@dataclass(frozen=True)
class PScores:
    """P_up, P_comp and P_1 in percent (``compatibility_scores``)."""

    p_up: float
    p_comp: float
    p_1: float


@dataclass(frozen=True)
class UpgradeReport:
    """An upgrade's tests: M(o,o), M(n,n), M(n,o), and with an independent model M(*,*) and M(*,o); the scores
    and the criterion follow from them (on mAP)."""

    old: TestResult
    self_test: TestResult
    cross: TestResult
    independent: TestResult | None = None
    independent_cross: TestResult | None = None
    criterion: Criterion = field(init=False)

    def __post_init__(self) -> None:
        margins = (self.cross.map - self.old.map, self.self_test.map - self.old.map)
        object.__setattr__(self, "criterion", compatibility_criterion(*margins))

    @classmethod
    def from_tests(cls, tests: Mapping[str, TestResult]) -> UpgradeReport:
        """From tests named as in results.json; the independent ones are optional."""
        return cls(tests[OLD], tests[SELF], tests[CROSS], tests.get(INDEPENDENT), tests.get(INDEPENDENT_CROSS))

    @classmethod
    def from_json(cls, data: Mapping) -> UpgradeReport:
        """Read back the ``tests`` of a report :meth:`to_json` wrote (extra keys, such as a quickstart's gate,
        are the caller's)."""
        return cls.from_tests({name: TestResult(dict(values)) for name, values in data["tests"].items()})

    def tests(self) -> dict[str, TestResult]:
        """The tests present, by their results.json names, in report order."""
        present = (self.old, self.self_test, self.cross, self.independent, self.independent_cross)
        return {name: test for name, test in zip(UPGRADE_TESTS, present, strict=True) if test is not None}

    @property
    def p_scores(self) -> PScores | None:
        """None without an independent model. Raises ``ValueError`` where M(*,*) equals M(o,o) (P_comp divides by
        their difference)."""
        if self.independent is None:
            return None
        scores = compatibility_scores([self.old.map], [self.independent.map], [self.self_test.map], [self.cross.map])
        return PScores(**scores)

    @property
    def cross_vs_independent(self) -> float | None:
        """M(n,o) / M(*,o): how far the cross test stands above an incompatible model's, which sits near chance.
        A criterion met against a weak old model can still leave the cross test close to chance; this shows it."""
        if self.independent_cross is None or self.independent_cross.map <= 0.0:
            return None
        return self.cross.map / self.independent_cross.map

    @property
    def independent_above_old(self) -> bool:
        """Whether P_comp's reference gap M(*,*) - M(o,o) is positive, the case its formula is made for."""
        return self.independent is not None and self.independent.map > self.old.map

    def to_json(self) -> dict:
        """The results.json form: ``tests``, then the P scores, the ratio and the criterion where defined."""
        report: dict = {"tests": {name: test.to_json() for name, test in self.tests().items()}}
        scores = self.p_scores
        if scores is not None:
            report.update(p_up=scores.p_up, p_comp=scores.p_comp, p_1=scores.p_1)
        if self.cross_vs_independent is not None:
            report["cross_vs_independent"] = self.cross_vs_independent
        report["criterion"] = self.criterion.cross
        report["self_criterion"] = self.criterion.self_test
        report["upgrade_ok"] = self.criterion.upgrade_ok
        return report


def method_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """The tests :func:`method_reports` reads: the shared ones once, then each method's self and cross test."""
    return [*SHARED_PAIRS, *[pair for method in methods for pair in ((method, method), (method, "old"))]]


def method_reports(tests: Mapping[str, TestResult], methods: Sequence[str]) -> dict[str, UpgradeReport]:
    """One upgrade report per method from tests named ``"query/gallery"`` by model, holding at least
    :func:`method_pairs` (a full table's matrix does)."""
    return {
        method: UpgradeReport(
            old=tests[OLD],
            self_test=tests[pair_name(method, method)],
            cross=tests[pair_name(method, "old")],
            independent=tests[INDEPENDENT],
            independent_cross=tests[INDEPENDENT_CROSS],
        )
        for method in methods
    }


@dataclass(frozen=True)
class LiveUpgradeReport:
    """The quickstart's report: the offline upgrade tests on the test split, then the live half as the service
    records it: the gate's decision on the validation split (the registry's JSON, plus the candidate's name), the
    backfill curves with their live checks, and the gallery's state. ``method`` names the compatible model."""

    method: str
    upgrade: UpgradeReport
    gate: dict
    backfill: dict
    gallery: dict

    @classmethod
    def from_json(cls, data: Mapping) -> LiveUpgradeReport:
        upgrade = UpgradeReport.from_json(data)
        return cls(data["method"], upgrade, data["gate"], data["backfill"], data["gallery"])

    def to_json(self) -> dict:
        """results.json: ``method``, the upgrade report's keys, then ``gate``, ``backfill`` and ``gallery``."""
        upgrade = self.upgrade.to_json()
        return {"method": self.method, **upgrade, "gate": self.gate, "backfill": self.backfill, "gallery": self.gallery}


@dataclass(frozen=True)
class RunCost:
    """A training run's wall time over its epochs and its mean throughput (None where no epoch recorded one)."""

    seconds: float
    images_per_s: float | None

    @classmethod
    def from_history(cls, history_path: Path) -> RunCost:
        """From a run's ``history.json`` (no file: zero seconds and no rate), summing the epochs' seconds."""
        history = json.loads(history_path.read_text()) if history_path.is_file() else []
        rates = [epoch["images_per_s"] for epoch in history if "images_per_s" in epoch]
        seconds = sum(epoch.get("seconds", 0.0) for epoch in history)
        return cls(seconds, sum(rates) / len(rates) if rates else None)

    def to_json(self) -> dict:
        return {"seconds": self.seconds, "images_per_s": self.images_per_s}

    @classmethod
    def from_json(cls, data: Mapping) -> RunCost:
        return cls(data["seconds"], data["images_per_s"])


@dataclass(frozen=True)
class SettingResult:
    """One setting of the bench: each method's upgrade report, the mAP of every (query, gallery) pair of the
    setting's ``models``, each run's cost, and the old and new architectures."""

    methods: dict[str, UpgradeReport]
    matrix: dict[str, float]
    models: list[str]
    runs: dict[str, RunCost]
    old_backbone: str
    new_backbone: str

    def to_json(self) -> dict:
        return {
            "methods": {method: report.to_json() for method, report in self.methods.items()},
            "matrix": self.matrix,
            "models": self.models,
            "runs": {name: cost.to_json() for name, cost in self.runs.items()},
            "old_backbone": self.old_backbone,
            "new_backbone": self.new_backbone,
        }

    @classmethod
    def from_json(cls, data: Mapping) -> SettingResult:
        return cls(
            methods={method: UpgradeReport.from_json(report) for method, report in data["methods"].items()},
            matrix=dict(data["matrix"]),
            models=list(data["models"]),
            runs={name: RunCost.from_json(cost) for name, cost in data["runs"].items()},
            old_backbone=data["old_backbone"],
            new_backbone=data["new_backbone"],
        )


@dataclass(frozen=True)
class BenchResults:
    """The whole bench: its preset and every setting's result, in the order run."""

    preset: str
    settings: dict[str, SettingResult]

    def to_json(self) -> dict:
        return {"preset": self.preset, "settings": {name: block.to_json() for name, block in self.settings.items()}}

    @classmethod
    def from_json(cls, data: Mapping) -> BenchResults:
        return cls(data["preset"], {name: SettingResult.from_json(b) for name, b in data["settings"].items()})

"""The backfill study: retrieval quality while a gallery is re-embedded, for every order policy and both merges,
computed exactly from a run folder's checkpoints (the quickstart's, or ``advbct compare``'s).

The test split is the gallery and the queries; the validation split that the old model's allocation set aside
fits the score calibrations, so nothing reported tunes itself. Negative flips are counted against the old
system's own answers (old queries, old gallery).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from advbct.compat import reference_method
from advbct.compat.statistics import load_statistics
from advbct.config import ConfigError
from advbct.data.images import ImageSet
from advbct.distributed import resolve_device
from advbct.evaluation.backfill import (
    DEFAULT_FRACTIONS,
    MERGES,
    ORDER_POLICIES,
    GalleryState,
    ScoreCalibration,
    backfill_curve,
    backfill_order,
    fit_calibration,
)
from advbct.evaluation.metrics import label_retrieval_scores
from advbct.evaluation.protocol import embed_images
from advbct.live import progress_bars
from advbct.models.checkpoint import load_checkpoint
from advbct.pipeline import embed_split, validation_images

# How the live service ranks a mixed gallery (``GalleryStore.search`` with the generation's calibration), and so
# the curve a report leads with; raw cosine is computed beside it for comparison.
SERVICE_MERGE = "calibrated"
HEADLINE = f"random/{SERVICE_MERGE}"


def fit_calibrations(
    paths: dict[str, Path], names: list[str], validation: ImageSet, device: str = "auto"
) -> dict[str, ScoreCalibration]:
    """Each named new model's score calibration against its own and the old model's embeddings of the
    validation split."""
    dev = resolve_device(device)
    embedded = {}
    for name in ("old", *names):
        model, meta = load_checkpoint(paths[name])
        embedded[name] = embed_images(model, validation.images, meta.prep, dev)
    return {name: fit_calibration(embedded[name], embedded[name], embedded["old"], validation.labels) for name in names}


def old_gallery_state(old_path: Path, old_embeddings: torch.Tensor, seed: int) -> GalleryState:
    """What an old gallery offers an order policy: its stored (L2-normalised) vectors, the old classifier and the
    old class centres."""
    model, meta = load_checkpoint(old_path)
    stats = load_statistics(old_path.parent / "stats.pt", expected_model_id=meta.model_id)
    stored = F.normalize(old_embeddings.float(), dim=1)
    return GalleryState(stored, seed, old_classifier=model.head.eval(), old_centres=stats.centres)


@dataclass(frozen=True)
class StudyPlan:
    """Which curves a study computes: the ``studied`` models under each of ``orders`` (random order under
    ``merges`` at ``fractions``, the other orders under ``order_merges`` at ``order_fractions``); the other models
    in random order under ``reference_merges``."""

    studied: tuple[str, ...]
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    orders: tuple[str, ...] = tuple(ORDER_POLICIES)
    merges: tuple[str, ...] = MERGES
    order_fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    order_merges: tuple[str, ...] = MERGES
    reference_merges: tuple[str, ...] = MERGES

    def __post_init__(self) -> None:
        unknown = [o for o in self.orders if o not in ORDER_POLICIES]
        unknown += [m for m in (*self.merges, *self.order_merges, *self.reference_merges) if m not in MERGES]
        if unknown:
            raise ConfigError(f"unknown orders or merges {unknown}: orders are {', '.join(ORDER_POLICIES)}; merges "
                             f"{', '.join(MERGES)}")  # fmt: skip

    def curves(self, models: list[str]) -> list[tuple[str, str, str, tuple[float, ...]]]:
        """(model, order, merge, fractions) of every curve."""
        plans = []
        for name in models:
            if name not in self.studied:
                plans += [(name, "random", m, self.fractions) for m in self.reference_merges]
                continue
            if "random" in self.orders:
                plans += [(name, "random", m, self.fractions) for m in self.merges]
            others = [o for o in self.orders if o != "random"]
            plans += [(name, o, m, self.order_fractions) for o in others for m in self.order_merges]
        return plans


def backfill_study(
    paths: dict[str, Path],
    embeddings: dict[str, torch.Tensor],
    labels: torch.Tensor,
    calibrations: dict[str, ScoreCalibration],
    plan: StudyPlan,
    seed: int = 0,
    console: Console | None = None,
    show_progress: bool = True,
) -> dict:
    """The exact curves the plan names, for every calibrated model (the independent one, say, beside the
    methods studied)."""
    old = embeddings["old"]
    baseline = label_retrieval_scores(old, labels, old, labels, exclude_same_index=True, ks=(1,))
    state = old_gallery_state(paths["old"], old, seed)
    curves: dict[str, dict] = {name: {} for name in calibrations}
    with progress_bars(console or Console(), show_progress) as bars:
        for name, order_name, merge, fractions in bars.track(plan.curves(list(calibrations)), description="curves"):
            new = embeddings[name]
            order = backfill_order(order_name, dataclasses.replace(state, new=new))
            calibration = calibrations[name] if merge == "calibrated" else None
            curve = backfill_curve(new, old, new, labels, order, fractions, baseline=baseline,
                                   calibration=calibration, order_name=order_name)  # fmt: skip
            curves[name][f"{order_name}/{merge}"] = curve.to_json()
    return {
        "seed": seed,
        "old_map": baseline.means()["map"],
        "headline": HEADLINE,
        "curves": curves,
        "calibration": {name: c.to_json() for name, c in calibrations.items()},
    }


def studied_by_default(run: Path) -> str:
    """The method a run folder's study looks at when none is named: a quickstart's compatible model (its
    ``results.json`` names it), else the paper's AdvBCT."""
    try:
        return json.loads((run / "results.json").read_text())["method"]
    except (OSError, ValueError, KeyError, TypeError):  # no quickstart report here: a compare folder or a bare one
        return "advbct"


def study_run_folder(
    run: Path,
    plan: StudyPlan,
    seed: int = 0,
    data_root: str | None = None,
    device: str = "auto",
    console: Console | None = None,
    show_progress: bool = True,
) -> dict:
    """The study of a run folder's studied methods (each ``run/<method>/model.pt``) beside its independent model,
    written to ``run/backfill_study.json``."""
    names = [*plan.studied, reference_method()]
    paths = {name: run / name / "model.pt" for name in ("old", *names)}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the run folder lacks {', '.join(missing)}")
    embeddings, labels = embed_split(paths, data_root, device)
    calibrations = fit_calibrations(paths, names, validation_images(paths["old"], data_root), device)
    study = backfill_study(paths, embeddings, labels, calibrations, plan, seed, console, show_progress)
    (run / "backfill_study.json").write_text(json.dumps(study, indent=2))
    return study

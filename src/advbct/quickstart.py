"""The main job, the paper's scenario end to end: an old model serving a Milvus gallery, a compatible new model
trained, gated on the validation split and put live at once, the backfill re-embedding the gallery behind it.

old model -> old-class statistics -> the test images indexed by the old model (generation 1) -> the AdvBCT and
independent new models -> the gate -> generation 2 live against the old gallery -> the backfill, with live checks
-> the offline table, the exact backfill curves and the verdict. Finished steps are skipped on a re-run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console

from advbct.compat.statistics import load_statistics
from advbct.config import QuickstartConfig
from advbct.data.allocation import load_allocation
from advbct.data.images import ImageSet
from advbct.data.sources import load_split
from advbct.distributed import current_world, resolve_device, shutdown
from advbct.evaluation.backfill import (
    MERGES,
    ORDER_POLICIES,
    GalleryState,
    ScoreCalibration,
    backfill_curve,
    backfill_order,
    fit_calibration,
)
from advbct.evaluation.metrics import label_retrieval_scores
from advbct.evaluation.protocol import embed_images, evaluate_pairs
from advbct.live import (
    LiveGallery,
    backfill_with_checks,
    deploy,
    index_gallery,
    live_check,
    probe_queries,
    progress_bars,
)
from advbct.models.checkpoint import load_checkpoint
from advbct.pipeline import (
    ALLOCATION_FILE,
    embed_test_set,
    method_pairs,
    method_reports,
    plan_new_models,
    train_new_models,
)
from advbct.reporting.backfill_plot import plot_backfill
from advbct.reporting.tables import print_live_report, print_report

METHOD = "advbct"
GALLERY = "gallery"
# How the live service ranks a mixed gallery (``GalleryStore.search`` with the generation's calibration); the
# raw-cosine curves are computed beside it for comparison.
SERVICE_MERGE = "calibrated"


def validation_split(cfg: QuickstartConfig, out: Path) -> ImageSet:
    """The training images that the allocation set aside: no model trained on them."""
    allocation = load_allocation(out / "old" / ALLOCATION_FILE)
    if allocation.validation_indices.numel() == 0:
        raise ValueError("the quickstart gates on a validation split: set common.data.validation_per_class > 0")
    return load_split(cfg.old.data, "train").subset(allocation.validation_indices)


def quickstart(cfg: QuickstartConfig, out: Path, console: Console | None = None, show_progress: bool = True) -> dict:
    """Run (or finish) the main job in ``out``; its report, also written to ``out/results.json``."""
    console = console or Console()
    main = current_world().is_main
    old_path, runs = plan_new_models(cfg, out, [METHOD], console, show_progress)
    test_set = load_split(cfg.old.data, "test")
    gallery = None
    if main:
        console.print("[bold]gallery[/]: the test images in Milvus Lite, embedded by the old model (generation 1)")
        gallery = index_gallery(out / GALLERY, old_path, test_set, console, show_progress)
    paths = dict(zip([r.method for r in runs], train_new_models(runs, console, show_progress, cfg.jobs), strict=True))
    paths["old"] = old_path
    console.print("[bold]evaluation[/] (test split)")
    embeddings, labels = embed_test_set(paths, device=cfg.new.device)
    tests = evaluate_pairs(embeddings, labels, method_pairs([METHOD]), resolve_device(cfg.new.device))
    report = method_reports(tests, [METHOD])[METHOD]
    # The live half is one serving process, as a deployment is: the other ranks are done with the offline table.
    shutdown()
    if not main:
        return report
    try:
        report.update(live_upgrade(cfg, out, gallery, paths, embeddings, labels, console, show_progress))
    finally:
        gallery.close()
    (out / "results.json").write_text(json.dumps(report, indent=2))
    plot_backfill(report, out / "backfill.png")
    print_report(report, console)
    print_live_report(report, console)
    return report


def live_upgrade(
    cfg: QuickstartConfig,
    out: Path,
    gallery: LiveGallery,
    paths: dict[str, Path],
    embeddings: dict[str, torch.Tensor],
    labels: torch.Tensor,
    console: Console,
    show_progress: bool,
) -> dict:
    """The gate, the deployment and the backfill with its live checks; the ``gate`` and ``backfill`` blocks."""
    live = cfg.live
    candidate = METHOD if live.candidate == METHOD else "independent"
    console.print(f"[bold]compatibility gate[/]: {candidate} against the old model on the validation split")
    validation = validation_split(cfg, out)
    gate = deploy(gallery, paths[candidate], validation, live.force)
    console.print("[bold]backfill curves[/] (test split; every order and merge for AdvBCT)")
    calibrations = fit_calibrations(paths, validation, cfg.new.device)
    backfill = offline_curves(paths, embeddings, labels, calibrations, live.backfill_seed, console, show_progress)
    order = backfill_order("random", GalleryState(embeddings["old"], seed=live.backfill_seed))
    if gate["generation"] is not None:
        probe = probe_queries(len(labels), live.probe_queries, live.backfill_seed)
        checks = backfill_with_checks(gallery, order, live.check_fractions, probe, labels, console, show_progress)
        emb, served = embeddings[candidate], gallery.registry.active.gate.get("calibration")
        calibration = None if served is None else ScoreCalibration.from_json(served)
        check = live_check(checks, emb, embeddings["old"], emb, labels, order, probe, calibration)
        backfill["live"] = {"model": candidate, **check}
    gate = {**gate, "candidate": candidate, "split": "validation"}
    return {"gate": gate, "backfill": backfill, "gallery": {"items": len(labels), **gallery_state(gallery)}}


def fit_calibrations(paths: dict[str, Path], validation: ImageSet, device: str) -> dict[str, ScoreCalibration]:
    """Each new model's score calibration against its own and the old model's embeddings, from the validation
    split (the test split is what the curves report, so it never tunes them)."""
    dev = resolve_device(device)
    embedded = {}
    for name in ("old", METHOD, "independent"):
        model, meta = load_checkpoint(paths[name])
        embedded[name] = embed_images(model, validation.images, meta.prep, dev)
    return {
        name: fit_calibration(embedded[name], embedded[name], embedded["old"], validation.labels)
        for name in (METHOD, "independent")
    }


def old_gallery_state(old_path: Path, old_embeddings: torch.Tensor, seed: int) -> GalleryState:
    """What the old gallery offers an order policy: the old embeddings, the old classifier and class centres."""
    model, meta = load_checkpoint(old_path)
    head = model.head.eval()
    stats = load_statistics(old_path.parent / "stats.pt", expected_model_id=meta.model_id)
    return GalleryState(old_embeddings, seed, old_classifier=head, old_centres=stats.centres)


def offline_curves(
    paths: dict[str, Path],
    embeddings: dict[str, torch.Tensor],
    labels: torch.Tensor,
    calibrations: dict[str, ScoreCalibration],
    seed: int,
    console: Console,
    show_progress: bool,
) -> dict:
    """The exact backfill curves: AdvBCT under every order policy and both merges, the independent model in
    random order under both merges; negative flips counted against the old system's own answers."""
    old = embeddings["old"]
    baseline = label_retrieval_scores(old, labels, old, labels, exclude_same_index=True, ks=(1,))
    state = old_gallery_state(paths["old"], old, seed)
    plans = [(METHOD, o, m) for o in ORDER_POLICIES for m in MERGES] + [("independent", "random", m) for m in MERGES]
    curves: dict[str, dict] = {METHOD: {}, "independent": {}}
    with progress_bars(console, show_progress) as bars:
        for name, order_name, merge in bars.track(plans, description="backfill curves"):
            new = embeddings[name]
            order = backfill_order(order_name, GalleryState(**{**state.__dict__, "new": new}))
            calibration = calibrations[name] if merge == "calibrated" else None
            curve = backfill_curve(new, old, new, labels, order, baseline=baseline, calibration=calibration,
                                   order_name=order_name)  # fmt: skip
            curves[name][f"{order_name}/{merge}"] = curve.to_json()
    return {
        "seed": seed,
        "headline": f"random/{SERVICE_MERGE}",
        "curves": curves,
        "calibration": {name: c.to_json() for name, c in calibrations.items()},
        "live": None,
    }


def gallery_state(gallery: LiveGallery) -> dict:
    active = gallery.registry.active
    counts = gallery.store.ledger.counts()
    return {"active_generation": active.number, "by_generation": {str(g): n for g, n in counts.items()}}

"""The main job, the paper's scenario end to end: an old model serving a Milvus gallery, a compatible new model
trained, gated on the validation split and put live at once, the backfill re-embedding the gallery behind it.

old model -> old-class statistics -> the test images indexed by the old model (generation 1) -> the compatible
new model (``new.compat.method``) and the independent one -> the gate -> generation 2 live against the old gallery
-> the backfill, with live checks -> the offline table, the exact backfill curves and the verdict. Finished steps
are skipped on a re-run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console

from advbct.backfill_study import StudyPlan, backfill_study, fit_calibrations
from advbct.compat import reference_method
from advbct.config import ConfigError, QuickstartConfig
from advbct.data.sources import load_split
from advbct.distributed import current_world, resolve_device, shutdown
from advbct.evaluation.backfill import (
    GalleryState,
    ScoreCalibration,
    backfill_order,
)
from advbct.evaluation.protocol import evaluate_pairs
from advbct.evaluation.results import LiveUpgradeReport, UpgradeReport, method_pairs, method_reports
from advbct.live import (
    LiveGallery,
    backfill_with_checks,
    deploy,
    index_gallery,
    live_check,
    probe_queries,
)
from advbct.pipeline import (
    embed_split,
    plan_new_models,
    train_new_models,
    validation_images,
)
from advbct.reporting.backfill_plot import plot_backfill
from advbct.reporting.tables import print_live_report, print_report

GALLERY = "gallery"


def quickstart_study(method: str) -> StudyPlan:
    """The compatible model under every order at every tenth (random order under both merges, the others under the
    service's), the independent model in random order under the service's merge: each point ranks the whole test
    split once, so the raw-cosine curves of the other orders, and the independent model's, are left to
    ``advbct backfill-curves``."""
    return StudyPlan((method,), order_merges=("calibrated",), reference_merges=("calibrated",))


def compatible_method(cfg: QuickstartConfig) -> str:
    """The method of the new model the quickstart trains beside the independent one, and deploys."""
    method = cfg.new.compat.method
    if method == reference_method():
        raise ConfigError(f"new.compat.method is {method!r}: the quickstart trains that model beside a compatible one")
    return method


def quickstart(
    cfg: QuickstartConfig, out: Path, console: Console | None = None, show_progress: bool = True
) -> UpgradeReport | LiveUpgradeReport:
    """Run (or finish) the main job in ``out``; its report, also written to ``out/results.json``. Ranks other than
    the first of a torchrun job return the offline tests alone: the live half runs in one serving process."""
    console = console or Console()
    main = current_world().is_main
    method = compatible_method(cfg)
    old_path, runs = plan_new_models(cfg, out, [method], console, show_progress)
    test_set = load_split(cfg.old.data, "test")
    gallery = None
    if main:
        console.print("[bold]gallery[/]: the test images in Milvus Lite, embedded by the old model (generation 1)")
        gallery = index_gallery(out / GALLERY, old_path, test_set, console, show_progress)
    paths = dict(zip([r.method for r in runs], train_new_models(runs, console, show_progress, cfg.jobs), strict=True))
    paths["old"] = old_path
    console.print("[bold]evaluation[/] (test split)")
    embeddings, labels = embed_split(paths, device=cfg.new.device)
    tests = evaluate_pairs(embeddings, labels, method_pairs([method]), resolve_device(cfg.new.device))
    upgrade = method_reports(tests, [method])[method]
    # The live half is one serving process, as a deployment is: the other ranks are done with the offline table.
    shutdown()
    if not main:
        return upgrade
    try:
        live = live_upgrade(cfg, out, gallery, paths, embeddings, labels, console, show_progress)
    finally:
        gallery.close()
    report = LiveUpgradeReport(method, upgrade, **live)
    (out / "results.json").write_text(json.dumps(report.to_json(), indent=2))
    plot_backfill(report, out / "backfill.png")
    print_report(upgrade, console)
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
    live, method = cfg.live, compatible_method(cfg)
    candidate = method if live.candidate == "method" else "independent"
    console.print(f"[bold]compatibility gate[/]: {candidate} against the old model on the validation split")
    validation = validation_images(paths["old"], cfg.old.data.root)
    deployment = deploy(gallery, paths[candidate], validation, live.force)
    console.print(f"[bold]backfill curves[/] (test split; every order and merge for {method})")
    calibrations = fit_calibrations(paths, [method, "independent"], validation, cfg.new.device)
    seed, plan = live.backfill_seed, quickstart_study(method)
    study = backfill_study(paths, embeddings, labels, calibrations, plan, seed, console, show_progress)
    backfill: dict = {**study, "live": None}
    order = backfill_order("random", GalleryState(embeddings["old"], seed=seed))
    if deployment.generation is not None:
        probe = probe_queries(len(labels), live.probe_queries, live.backfill_seed)
        checks = backfill_with_checks(gallery, order, live.check_fractions, probe, labels, console, show_progress)
        emb, served = embeddings[candidate], gallery.registry.active.gate.calibration
        calibration = None if served is None else ScoreCalibration.from_json(served)
        check = live_check(checks, emb, embeddings["old"], emb, labels, order, probe, calibration)
        backfill["live"] = {"model": candidate, **check}
    gate = {**deployment.to_json(), "candidate": candidate, "split": "validation"}
    return {"gate": gate, "backfill": backfill, "gallery": {"items": len(labels), **gallery_state(gallery)}}


def gallery_state(gallery: LiveGallery) -> dict:
    """The serving generation and how many items each generation holds: what the backfill left behind."""
    active = gallery.registry.active
    counts = gallery.store.ledger.counts()
    return {"active_generation": active.number, "by_generation": {str(g): n for g, n in counts.items()}}

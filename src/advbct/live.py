"""The main job's live half: the test images as a Milvus gallery that the old model embedded, the new model put
live behind the compatibility gate, and the backfill re-embedding the gallery behind it, with the live answers
checked against the exact backfill curve at a few points.

Everything goes through the serving components a deployment uses (``GalleryStore``, ``ModelRegistry``,
``run_backfill``), so the folder it leaves is a gallery ``advbct serve`` can open: ``gallery.db`` (Milvus Lite),
``gallery.db.registry.sqlite`` (the generations) and ``images/`` (the items' files, PNG, as the references name them).
Item ids are the test images' positions, so a search hit names the test image it found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from advbct.data.images import ImageSet
from advbct.evaluation.backfill import ScoreCalibration, backfill_curve, refreshed_count
from advbct.evaluation.metrics import metrics_from_rankings
from advbct.models.checkpoint import load_checkpoint
from advbct.serving.backfill import BackfillProgress, run_backfill
from advbct.serving.gate import GateResult
from advbct.serving.ledger import open_counted_store
from advbct.serving.models import Embedder
from advbct.serving.registry import ModelRegistry
from advbct.serving.store import GalleryStore

GALLERY_DB = "gallery.db"
IMAGES = "images"
LIVE_CHECKS = "live_checks.json"
# The most hits one Milvus search returns (its topk cap); a probe ranks the whole gallery up to this size.
MAX_HITS = 16_384


@dataclass
class LiveGallery:
    """A gallery folder: its store, its registry and the files its references name."""

    folder: Path
    store: GalleryStore
    registry: ModelRegistry

    @property
    def image_root(self) -> Path:
        return self.folder / IMAGES

    def close(self) -> None:
        self.store.close()


def item_refs(images: ImageSet) -> list[str]:
    """Each image's reference: ``<class>/<position>.png``."""
    return [f"{images.classes[int(label)]}/{i:05d}.png" for i, label in enumerate(images.labels)]


def write_item_files(images: ImageSet, root: Path, refs: list[str]) -> None:
    """The images as lossless PNG files, so the backfill decodes exactly the pixels that were evaluated."""
    for ref, image in zip(refs, images.images, strict=True):
        path = root / ref
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def progress_bars(console: Console, show: bool) -> Progress:
    """Bars that disappear when done (``transient``), so the report printed after them stays readable."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console, disable=not show, transient=True)


def index_gallery(
    folder: Path, old_path: Path, images: ImageSet, console: Console, show_progress: bool = True, batch_size: int = 512
) -> LiveGallery:
    """Generation 1: the old model registered and every image embedded and added (finished work is kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry(folder / f"{GALLERY_DB}.registry.sqlite")
    if registry.active is None:
        registry.register_first(old_path)
        registry.reserve_ids(len(images))
    embedder = Embedder(registry.generation(1).path)
    gallery = LiveGallery(folder, open_counted_store(registry, str(folder / GALLERY_DB), embedder.dim), registry)
    refs = item_refs(images)
    write_item_files(images, gallery.image_root, refs)
    if gallery.store.ledger.total() == len(images):
        return gallery
    stored: set[int] = set()
    for start in range(0, len(images), 4096):
        stored |= gallery.store.existing(list(range(start, min(start + 4096, len(images)))))
    missing = [i for i in range(len(images)) if i not in stored]
    with progress_bars(console, show_progress) as bars:
        task = bars.add_task("indexing the gallery (old model)", total=len(missing))
        for start in range(0, len(missing), batch_size):
            ids = missing[start : start + batch_size]
            vectors = embedder.embed_files([gallery.image_root / refs[i] for i in ids])
            gallery.store.add(ids, [refs[i] for i in ids], vectors, generation=1)
            bars.advance(task, len(ids))
    return gallery


@dataclass(frozen=True)
class Deployment:
    """The gate's result for a candidate and the generation it serves as (None where the gate refused it)."""

    gate: GateResult | None
    generation: int | None

    def to_json(self) -> dict:
        """The gate's JSON with the generation number after it."""
        return {**(self.gate.to_json() if self.gate is not None else {}), "generation": self.generation}


def deploy(gallery: LiveGallery, candidate: Path, validation: ImageSet, force: bool) -> Deployment:
    """The compatibility gate on the validation split, and the candidate registered as the active generation when
    it passes (or ``force``); its numbers either way. A candidate registered by an earlier run is not gated again."""
    model_id = load_checkpoint(candidate)[1].model_id
    registered = next((g for g in gallery.registry.generations if g.model_id == model_id), None)
    if registered is not None:
        return Deployment(registered.gate, registered.number)
    result = gallery.registry.check_gate(candidate, validation)
    if result.passed or force:
        generation = gallery.registry.upgrade(
            candidate, validation, force=force, reason="live.force=true in the run's config"
        )
        return Deployment(generation.gate, generation.number)
    return Deployment(replace(result, forced=False), None)


def probe_queries(num_items: int, count: int, seed: int) -> torch.Tensor:
    """The seeded test images whose live answers are checked."""
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(num_items, generator=generator)[: min(count, num_items)].sort().values


def live_scores(gallery: LiveGallery, embedder: Embedder, probe: torch.Tensor, labels: torch.Tensor) -> dict:
    """mAP and top-1 of the probe's queries as the service answers them now: embedded from their files by the
    active model, searched in Milvus over the whole gallery and merged across generations as the service does."""
    refs = [r["ref"] for r in sorted(gallery.store.get(probe.tolist()), key=lambda r: int(r["id"]))]
    queries = embedder.embed_files([gallery.image_root / ref for ref in refs])
    k = min(len(labels), MAX_HITS)
    hits = gallery.store.search(queries, k, gallery.registry.active.mixed_merge())
    # A row shorter than k (a gallery smaller than the cap) is padded with the query's own id, which is not ranked.
    rows = [[h.id for h in row] + [int(own)] * (k - len(row)) for row, own in zip(hits, probe.tolist(), strict=True)]
    ranked = torch.tensor(rows)
    return metrics_from_rankings(ranked, probe, labels)


def backfill_with_checks(
    gallery: LiveGallery,
    order: torch.Tensor,
    fractions: list[float],
    probe: torch.Tensor,
    labels: torch.Tensor,
    console: Console,
    show_progress: bool = True,
) -> list[dict]:
    """Run the backfill in ``order`` to the end, pausing at each of ``fractions`` to score the probe live.

    Checks already made (by a run that was stopped) are read from the gallery folder and not repeated; a fraction
    the gallery has already passed without a check is reported as not measured."""
    active = gallery.registry.active
    embedder = Embedder(active.path)
    path = gallery.folder / LIVE_CHECKS
    checks: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}
    total = len(labels)
    with progress_bars(console, show_progress) as bars:
        task = bars.add_task(f"backfill to generation {active.number}", total=total)
        for fraction in sorted({*fractions, 1.0}):
            key = f"{fraction:g}"
            done = gallery.store.ledger.counts().get(active.number, 0)
            bars.update(task, completed=done)
            wanted = refreshed_count(total, fraction)
            if wanted > done:

                def show(progress: BackfillProgress, start: int = done) -> None:
                    bars.update(task, completed=start + progress.done)

                run_backfill(gallery.store, embedder, active.number, gallery.image_root, order=order.tolist(),
                             limit=wanted - done, on_batch=show)  # fmt: skip
                done = wanted
            if key not in checks and fraction in fractions:
                checks[key] = live_scores(gallery, embedder, probe, labels) if done == wanted else {}
                path.write_text(json.dumps(checks))
    return [{"fraction": float(key), **value} for key, value in sorted(checks.items(), key=lambda kv: float(kv[0]))]


def live_check(
    checks: list[dict],
    queries: torch.Tensor,
    old_gallery: torch.Tensor,
    new_gallery: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    probe: torch.Tensor,
    calibration: ScoreCalibration | None,
) -> dict:
    """The live scores beside the exact curve of the same probe queries at the same fractions (under the merge the
    service used), and the largest difference between them (percentage points)."""
    measured = [c for c in checks if "map" in c]
    fractions = tuple(c["fraction"] for c in measured)
    exact = backfill_curve(
        queries[probe], old_gallery, new_gallery, labels, order, fractions, probe, calibration=calibration
    )
    points = [{**c, "exact_map": m, "exact_top1": t} for c, m, t in zip(measured, exact.map, exact.top1, strict=True)]
    differences = [abs(p["map"] - p["exact_map"]) for p in points] + [abs(p["top1"] - p["exact_top1"]) for p in points]
    return {
        "probe_queries": int(probe.numel()),
        "points": points,
        "max_difference": max(differences) if differences else None,
        "not_measured": [c["fraction"] for c in checks if "map" not in c],
    }

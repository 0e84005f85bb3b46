"""The upgrade path as functions: train old -> statistics -> train new -> evaluate, and all of it at once.

The CLI is a thin layer over these, so notebooks and tests drive exactly what users run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from advbct.compat import (
    ClassStatistics,
    check_options,
    compute_class_statistics,
    load_statistics,
    method_class,
    method_info,
    radius_summary,
    reference_method,
    save_statistics,
)
from advbct.compat.advbct import PAPER_TAU
from advbct.config import CompatConfig, ConfigError, DataConfig, QuickstartConfig, TrainConfig
from advbct.data.allocation import Allocation, load_allocation, load_or_make_allocation
from advbct.data.images import DataError, ImageSet
from advbct.data.sources import load_split
from advbct.distributed import current_world, resolve_device
from advbct.evaluation.protocol import embed_images, evaluate_pairs
from advbct.evaluation.results import UPGRADE_PAIRS, TestResult, UpgradeReport, method_pairs, method_reports
from advbct.jobs import Task, check_jobs, run_concurrently
from advbct.models.checkpoint import load_checkpoint, load_comparable_checkpoints
from advbct.training.loop import train_model
from advbct.training.setup import OldModel

ALLOCATION_FILE = "allocation.json"


def _with_root(data: DataConfig, root: str | None) -> DataConfig:
    return data if root is None else data.model_copy(update={"root": root})


def prepare_allocation(cfg: DataConfig, train_set: ImageSet, path: Path) -> Allocation:
    """The saved split beside the run (made by rank 0 first under torchrun, then read by the others)."""
    world = current_world()

    def make() -> Allocation:
        return load_or_make_allocation(
            path,
            train_set.labels,
            train_set.num_classes,
            cfg.allocation,
            cfg.old_fraction,
            cfg.allocation_seed,
            cfg.validation_per_class,
        )

    if world.is_main:
        allocation = make()
    world.barrier()
    return allocation if world.is_main else make()


def train_old(cfg: TrainConfig, out: Path, show_progress: bool = True) -> Path:
    """Classification training of the old model on its allocation; writes ``out/allocation.json`` too."""
    train_set = load_split(cfg.data, "train")
    allocation = prepare_allocation(cfg.data, train_set, out / ALLOCATION_FILE)
    return train_model(cfg, out, "old", train_set, allocation, show_progress=show_progress)


def load_old(path: str | Path) -> OldModel:
    model, meta = load_checkpoint(path)
    return OldModel(model, meta, Path(path))


def _allocation_for(old_path: Path, explicit: Path | None) -> Allocation:
    path = explicit or old_path.parent / ALLOCATION_FILE
    if not path.is_file():
        raise DataError(f"allocation file not found: {path} (pass --allocation, the one written by train-old)")
    return load_allocation(path)


def _check_allocation_fits(allocation: Allocation, train_set: ImageSet) -> None:
    if allocation.num_samples != len(train_set) or allocation.num_classes != train_set.num_classes:
        raise DataError(
            f"the old model's allocation covers {allocation.num_samples} images of {allocation.num_classes} classes, "
            f"this training data has {len(train_set)} of {train_set.num_classes}: a different data root or "
            "data.max_train_per_class than the old model used"
        )


def _check_allocation_requested(allocation: Allocation, data: DataConfig, path: Path) -> None:
    """A new model trains on the old model's split; its config must ask for that split, or the run's record
    (config.json, the checkpoint's data section) would name another one than the model was trained on."""
    have = (allocation.kind, allocation.old_fraction, allocation.seed, allocation.validation_per_class)
    wanted = (data.allocation, data.old_fraction, data.allocation_seed, data.validation_per_class)
    if have != wanted:
        raise DataError(
            f"the old model's split {path} is (allocation, old_fraction, allocation_seed, validation_per_class)="
            f"{have}, this run's data section asks for {wanted}: set data.* to the old model's values"
        )


def compute_statistics(
    old_path: Path,
    out: Path | None = None,
    data_root: str | None = None,
    allocation_path: Path | None = None,
    device: str = "auto",
) -> tuple[ClassStatistics, Path]:
    """Embed the old training set with the frozen old model and save centres/radii keyed to it."""
    old = load_old(old_path)
    data = _with_root(old.meta.data, data_root)
    train_set = load_split(data, "train")
    allocation = _allocation_for(old_path, allocation_path)
    _check_allocation_fits(allocation, train_set)
    subset = train_set.subset(allocation.old_indices)
    emb = embed_images(old.model, subset.images, old.meta.prep, resolve_device(device))
    stats = compute_class_statistics(emb, subset.labels, train_set.num_classes, old.meta.model_id, train_set.classes)
    out = out or old_path.parent / "stats.pt"
    world = current_world()
    if world.is_main:
        save_statistics(stats, out)
    world.barrier()
    return stats, out


def train_new(
    cfg: TrainConfig,
    out: Path,
    old_path: Path | None,
    stats_path: Path | None = None,
    allocation_path: Path | None = None,
    show_progress: bool = True,
) -> Path:
    """A new model with ``cfg.compat.method``; the old model's split is reused so both saw the same data."""
    train_set = load_split(cfg.data, "train")
    old = load_old(old_path) if old_path is not None else None
    if old is not None:
        allocation = _allocation_for(old.path, allocation_path)
        _check_allocation_fits(allocation, train_set)
        _check_allocation_requested(allocation, cfg.data, allocation_path or old.path.parent / ALLOCATION_FILE)
    else:
        allocation = prepare_allocation(cfg.data, train_set, allocation_path or out / ALLOCATION_FILE)
    stats = None
    if stats_path is not None:
        stats = load_statistics(stats_path, old.meta.model_id if old is not None else None)
    return train_model(cfg, out, "new", train_set, allocation, old, stats, show_progress=show_progress)


EVAL_SPLITS = ("test", "validation")


def validation_images(old_path: Path, data_root: str | None = None) -> ImageSet:
    """The training images the old model's allocation set aside: no model of the run trained on them."""
    allocation = load_allocation(old_path.parent / ALLOCATION_FILE)
    if allocation.validation_indices.numel() == 0:
        raise ConfigError("the validation split is empty: set common.data.validation_per_class > 0")
    data = _with_root(load_checkpoint(old_path)[1].data, data_root)
    return load_split(data, "train").subset(allocation.validation_indices)


def embed_split(
    paths: dict[str, Path],
    data_root: str | None = None,
    device: str = "auto",
    batch_size: int = 1024,
    split: str = "test",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Embed the test split, or the validation split the old model's allocation set aside (``paths["old"]``),
    once per checkpoint; all must share one embedding dimension. The validation split is where recipes and
    variants are chosen, so the test split's numbers stay unseen until the final table."""
    if split not in EVAL_SPLITS:
        raise ConfigError(f"unknown split {split!r}; use one of {', '.join(EVAL_SPLITS)}")
    models = load_comparable_checkpoints(paths)
    if split == "validation":
        if "old" not in paths:
            raise ConfigError("the validation split is the old model's allocation's: give the old model")
        images = validation_images(paths["old"], data_root)
    else:
        images = load_split(_with_root(next(iter(models.values()))[1].data, data_root), "test")
    dev = resolve_device(device)
    embeddings = {
        name: embed_images(model, images.images, meta.prep, dev, batch_size) for name, (model, meta) in models.items()
    }
    return embeddings, images.labels


def evaluate(
    old_path: Path,
    new_path: Path,
    independent_path: Path | None = None,
    data_root: str | None = None,
    device: str = "auto",
    batch_size: int = 1024,
    split: str = "test",
) -> UpgradeReport:
    """M(o,o), M(n,n), M(n,o) (and M(*,*), M(*,o) with an independent model) on the test or validation split."""
    paths = {"old": old_path, "new": new_path}
    if independent_path is not None:
        paths["independent"] = independent_path
    embeddings, labels = embed_split(paths, data_root, device, batch_size, split)
    pairs = list(UPGRADE_PAIRS if independent_path is not None else UPGRADE_PAIRS[:3])
    return UpgradeReport.from_tests(evaluate_pairs(embeddings, labels, pairs, resolve_device(device)))


def evaluate_one(
    query_path: Path, gallery_path: Path, data_root: str | None = None, device: str = "auto"
) -> TestResult:
    """One test on the test split: queries embedded by one model, the gallery by another (or the same)."""
    embeddings, labels = embed_split({"query": query_path, "gallery": gallery_path}, data_root, device)
    return evaluate_pairs(embeddings, labels, [("query", "gallery")], resolve_device(device))["query/gallery"]


def _prepare_old(cfg: QuickstartConfig, out: Path, console: Console, show_progress: bool) -> tuple[Path, Path]:
    console.print(f"[bold]old model[/] ({cfg.old.data.allocation}, {cfg.old.model.backbone})")
    old_path = train_old(cfg.old, out / "old", show_progress)
    stats_path = out / "old" / "stats.pt"
    if not stats_path.is_file():
        console.print("[bold]old-class statistics[/]")
        stats, _ = compute_statistics(old_path, stats_path, device=cfg.old.device)
        console.print(radius_summary(stats, float(cfg.new.compat.options.get("tau", PAPER_TAU))).describe())
    return old_path, stats_path


def _train_run(run: NewModelRun, show_progress: bool) -> Path:
    new_cfg = run.cfg.new.model_copy(deep=True)
    new_cfg.compat = compat_config_for(run.cfg, run.method)
    stats = run.stats_path if method_info(run.method).needs_old_model else None
    return train_new(new_cfg, run.out / run.method, run.old_path, stats, show_progress=show_progress)


def options_for(method: str, options: dict) -> dict:
    """The configured compatibility options that ``method`` takes: a comparison sets options once (for the
    preset's method) and each method receives those it takes (AdvBCT's ablations take AdvBCT's, less the parts
    they fix; ``tau`` never reaches ``bct``)."""
    accepted = method_class(method).option_names()
    return {key: value for key, value in options.items() if key in accepted}


def compat_config_for(cfg: QuickstartConfig, method: str) -> CompatConfig:
    """``method``'s compatibility section in a run that configures ``cfg.new.compat``: that section itself for its
    own method, the options it takes for any other; a one-line :class:`CompatError` where a shared option's value
    does not suit ``method`` (``tau=stats`` set for advbct-tight reaches advbct, whose tau is a number)."""
    if method == cfg.new.compat.method:
        return cfg.new.compat.model_copy(deep=True)
    options = options_for(method, cfg.new.compat.options)
    check_options(method, options)
    return CompatConfig(method=method, options=options)


@dataclass(frozen=True)
class NewModelRun:
    """One new model to train: ``method`` into ``out/<method>``, against the old model and statistics given.
    ``label`` names it in progress messages (the method, or setting/method when a table trains several settings)."""

    cfg: QuickstartConfig
    out: Path
    method: str
    old_path: Path
    stats_path: Path
    label: str


def plan_new_models(
    cfg: QuickstartConfig, out: Path, methods: list[str], console: Console, show_progress: bool = True, label: str = ""
) -> tuple[Path, list[NewModelRun]]:
    """Train (or find) the old model and its statistics in ``out/old``; return it with the runs of the independent
    model and every method, which depend on nothing else and can train in any order or at once."""
    names = [reference_method(), *[m for m in methods if m != reference_method()]]
    for name in names:  # refused before the old model trains, not when a method's turn comes
        compat_config_for(cfg, name)
    out.mkdir(parents=True, exist_ok=True)
    old_path, stats_path = _prepare_old(cfg, out, console, show_progress)
    prefix = f"{label}/" if label else ""
    return old_path, [NewModelRun(cfg, out, name, old_path, stats_path, prefix + name) for name in names]


def train_new_models(
    runs: list[NewModelRun],
    console: Console,
    show_progress: bool = True,
    jobs: int = 1,
) -> list[Path]:
    """Each run's ``model.pt``, in the order given; finished runs are skipped. With ``jobs`` > 1 they train ``jobs``
    at a time, each in a process of its own: one small model leaves most of a GPU idle."""
    check_jobs(jobs)
    if jobs > 1 and not current_world().distributed:
        tasks = [Task(run.label, _train_run, (run,)) for run in runs]
        return run_concurrently("new models", tasks, jobs, console, show_progress)
    paths = []
    for run in runs:
        console.print(f"[bold]new model: {run.label}[/]")
        paths.append(_train_run(run, show_progress))
    return paths


def train_old_models(
    configs: dict[str, QuickstartConfig],
    out: Path,
    console: Console,
    jobs: int,
    show_progress: bool = True,
) -> None:
    """Train the old model of each ``configs`` entry into ``out/<name>/old`` at once, ``jobs`` at a time (finished
    ones are skipped), so that a table's settings do not wait for each other's old models one after another."""
    check_jobs(jobs)
    if jobs > 1 and len(configs) > 1 and not current_world().distributed:
        tasks = [Task(f"{name}/old", train_old, (cfg.old, out / name / "old")) for name, cfg in configs.items()]
        run_concurrently("old models", tasks, jobs, console, show_progress)


def train_methods(
    cfg: QuickstartConfig,
    out: Path,
    methods: list[str],
    console: Console,
    show_progress: bool = True,
    jobs: int = 1,
) -> dict[str, Path]:
    """The old model, its statistics, the independent model and every method: ``{name: model.pt}``."""
    check_jobs(jobs)
    old_path, runs = plan_new_models(cfg, out, methods, console, show_progress)
    paths = train_new_models(runs, console, show_progress, jobs)
    return {"old": old_path, **{run.method: path for run, path in zip(runs, paths, strict=True)}}


def compare(
    cfg: QuickstartConfig,
    out: Path,
    methods: list[str],
    console: Console | None = None,
    show_progress: bool = True,
    jobs: int = 1,
    split: str = "test",
) -> dict[str, UpgradeReport]:
    """Train the old model, the independent model and every method on one allocation and one seed set;
    return one upgrade report per method, on the test or the validation split (embedded once per model)."""
    console = console or Console()
    if split not in EVAL_SPLITS:
        raise ConfigError(f"unknown split {split!r}; use one of {', '.join(EVAL_SPLITS)}")
    paths = train_methods(cfg, out, methods, console, show_progress, jobs)
    console.print(f"[bold]evaluation[/] ({split} split)")
    embeddings, labels = embed_split(paths, device=cfg.new.device, split=split)
    tests = evaluate_pairs(embeddings, labels, method_pairs(methods), resolve_device(cfg.new.device))
    return method_reports(tests, methods)

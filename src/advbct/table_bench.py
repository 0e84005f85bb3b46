"""``advbct bench``: every method on every data setting, one seed set, one table.

For each setting (extended-class, extended-data, extended-backbone) the old model, its statistics, the
independent model and every compatibility method are trained (finished runs are skipped on a re-run), the test
set is embedded once per model, and every (query model, gallery model) pair is scored. The results go to
``results.json``, ``results.md`` (the paper-style table with training time and throughput per run) and plots.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from advbct.config import ModelConfig, QuickstartConfig, deep_merge, preset_tree
from advbct.data.images import DataError
from advbct.distributed import current_world, resolve_device
from advbct.evaluation.protocol import evaluate_pairs
from advbct.evaluation.results import BenchResults, RunCost, SettingResult, method_reports, pair_name
from advbct.jobs import check_jobs
from advbct.pipeline import (
    embed_split,
    plan_new_models,
    train_new_models,
    train_old_models,
)
from advbct.presets import build_quickstart
from advbct.reporting.bench_report import write_markdown, write_plots

SETTINGS = ("extended-class", "extended-data", "extended-backbone")


@dataclass(frozen=True)
class BenchPreset:
    """A quickstart preset to start from and what the extended-backbone setting changes in the new model."""

    base: str
    bigger_new_model: dict = field(default_factory=dict)


BENCH_PRESETS = {
    # resnet18 old -> resnet50 new, as in the paper.
    "cifar100": BenchPreset("paper-cifar100", {"backbone": "resnet50"}),
    # Twice the depth and width of the smoke model: the same change of architecture, in seconds.
    "smoke": BenchPreset("smoke", {"backbone_kwargs": {"layers": [2, 2, 2, 2], "channels": [16, 32, 64, 128]}}),
}


def setting_config(
    preset: str, setting: str, overrides: list[str], data: str | None, device: str | None
) -> QuickstartConfig:
    """The quickstart config of one setting of a bench preset, with the user's overrides on top."""
    if preset not in BENCH_PRESETS:
        raise DataError(f"unknown bench preset {preset!r}; use one of {', '.join(BENCH_PRESETS)}")
    bench = BENCH_PRESETS[preset]
    tree = preset_tree(bench.base)
    allocation = "extended-data" if setting == "extended-data" else "extended-class"
    tree = deep_merge(tree, {"common": {"data": {"allocation": allocation}}})
    if setting == "extended-backbone":
        tree = deep_merge(tree, {"new": {"model": bench.bigger_new_model}})
    return build_quickstart(tree, overrides, data, device, f"bench preset {preset} ({setting})")


def _architecture(model: ModelConfig) -> str:
    """The backbone name, with its layer and channel changes when a preset narrows or deepens it."""
    kwargs = ", ".join(f"{k}={v}" for k, v in model.backbone_kwargs.items())
    return f"{model.backbone} ({kwargs})" if kwargs else model.backbone


def evaluate_setting(cfg: QuickstartConfig, paths: dict[str, Path], methods: list[str]) -> SettingResult:
    """Score every (query model, gallery model) pair of one setting's trained models ``{name: model.pt}``."""
    embeddings, labels = embed_split(paths, device=cfg.new.device)
    names = list(paths)
    # Every pair is scored once; the per-method reports read the same numbers.
    matrix = evaluate_pairs(embeddings, labels, [(q, g) for q in names for g in names], resolve_device(cfg.new.device))
    return SettingResult(
        methods=method_reports(matrix, methods),
        matrix={pair_name(q, g): matrix[pair_name(q, g)].map for q in names for g in names},
        models=names,
        runs={name: RunCost.from_history(path.parent / "history.json") for name, path in paths.items()},
        old_backbone=_architecture(cfg.old.model),
        new_backbone=_architecture(cfg.new.model),
    )


def _old_model_twins(configs: dict[str, QuickstartConfig]) -> dict[str, str]:
    """``{setting: earlier setting}`` for each setting whose old model is trained exactly as an earlier one's is:
    extended-backbone changes only the new model, so its old model is extended-class's, trained once and copied."""
    twins: dict[str, str] = {}
    trained: dict[str, QuickstartConfig] = {}
    for setting, cfg in configs.items():
        twin = next((earlier for earlier, other in trained.items() if other.old == cfg.old), None)
        if twin is None:
            trained[setting] = cfg
        else:
            twins[setting] = twin
    return twins


def run_bench(
    preset: str,
    out: Path,
    settings: list[str],
    methods: list[str],
    overrides: list[str] | None = None,
    data: str | None = None,
    device: str | None = None,
    console: Console | None = None,
    show_progress: bool = True,
    jobs: int = 1,
) -> BenchResults:
    """Train and evaluate every setting into ``out/<setting>/``; write results.json, results.md and plots.
    The old models come first, then the new models of every setting together, each ``jobs`` at a time in
    processes of their own, so one command can keep a GPU full across settings."""
    console = console or Console()
    check_jobs(jobs)
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise DataError(f"unknown setting(s) {', '.join(unknown)}; use {', '.join(SETTINGS)}")
    configs = {s: setting_config(preset, s, list(overrides or []), data, device) for s in settings}
    twins = _old_model_twins(configs)
    train_old_models({s: c for s, c in configs.items() if s not in twins}, out, console, jobs, show_progress)
    plans = {}
    for setting, cfg in configs.items():
        console.rule(f"[bold]{setting}")
        if setting in twins and not (out / setting / "old" / "model.pt").is_file():
            console.print(f"old model: the same as {twins[setting]}'s, copied")
            shutil.copytree(out / twins[setting] / "old", out / setting / "old", dirs_exist_ok=True)
        plans[setting] = plan_new_models(cfg, out / setting, methods, console, show_progress, label=setting)
    runs = [run for _, setting_runs in plans.values() for run in setting_runs]
    console.rule("[bold]new models")
    model_paths = train_new_models(runs, console, show_progress, jobs)
    trained = {run.label: path for run, path in zip(runs, model_paths, strict=True)}
    blocks = {}
    for setting, (old_path, setting_runs) in plans.items():
        paths = {"old": old_path, **{run.method: trained[run.label] for run in setting_runs}}
        blocks[setting] = evaluate_setting(configs[setting], paths, methods)
    results = BenchResults(preset, blocks)
    if current_world().is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results.to_json(), indent=2))
        write_markdown(results, out / "results.md")
        write_plots(results, out)
    return results

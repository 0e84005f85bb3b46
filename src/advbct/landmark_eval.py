"""Self and cross tests on the landmark benchmarks, and the paper's table over them.

``evaluate_benchmarks`` embeds each benchmark's queries and gallery once per model that needs them, runs every
requested (query model, gallery model) test, and, given old, new and independent models, summarises the tests
with the paper's headline numbers (Medium mAP for ROxford / RParis, Private mAP@100 for GLDv2) and
P_up / P_comp / P_1 over the benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from advbct.data.benchmarks import BENCHMARK_NAMES, find_benchmark_root
from advbct.data.images import DataError
from advbct.distributed import resolve_device
from advbct.evaluation.compatibility import compatibility_scores, empirical_criterion
from advbct.evaluation.landmarks import LandmarkBenchmark, load_benchmark, run_test
from advbct.evaluation.protocol import embed_files
from advbct.models.checkpoint import ModelMeta, load_comparable_checkpoints
from advbct.models.embedding import EmbeddingModel

Loaded = tuple[EmbeddingModel, ModelMeta]
PAPER_TESTS = (("old", "old"), ("new", "new"), ("new", "old"), ("independent", "independent"), ("independent", "old"))


def parse_benchmarks(value: str) -> list[str]:
    """``paper`` (all three) or a comma-separated list of benchmark names."""
    names = list(BENCHMARK_NAMES) if value == "paper" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in BENCHMARK_NAMES]
    if unknown or not names:
        named = ", ".join(unknown) if unknown else repr(value)
        raise DataError(f"unknown benchmark {named}; use {', '.join(BENCHMARK_NAMES)} or paper")
    return names


def _embed_side(
    benchmark: LandmarkBenchmark, side: str, name: str, loaded: Loaded, device: torch.device, progress: Progress
) -> torch.Tensor:
    model, meta = loaded
    files = benchmark.query_files if side == "query" else benchmark.gallery_files
    boxes = benchmark.query_boxes if side == "query" else None
    task = progress.add_task(f"{benchmark.name} {side}s ({name} model)", total=len(files))
    return embed_files(model, meta.prep, files, device, boxes, on_batch=lambda n: progress.advance(task, n))


def _evaluate_benchmark(
    benchmark: LandmarkBenchmark,
    models: dict[str, Loaded],
    tests: Sequence[tuple[str, str]],
    device: torch.device,
    progress: Progress,
) -> dict:
    cache: dict[tuple[str, str], torch.Tensor] = {}

    def embedded(model: str, side: str) -> torch.Tensor:
        if (model, side) not in cache:
            cache[(model, side)] = _embed_side(benchmark, side, model, models[model], device, progress)
        return cache[(model, side)]

    results = {f"{q}/{g}": run_test(benchmark, embedded(q, "query"), embedded(g, "gallery"), device) for q, g in tests}
    return {
        "tests": results,
        "headline_name": benchmark.headline_name,
        "headline": {key: benchmark.headline(value) for key, value in results.items()},
    }


def evaluate_benchmarks(
    benchmarks: Sequence[str],
    models: dict[str, Path],
    tests: Sequence[tuple[str, str]],
    data_root: str | None = None,
    device: str = "auto",
    show_progress: bool = True,
) -> dict:
    """``{benchmark: {"tests": {"q/g": scores}, "headline": {"q/g": number}, "headline_name": str}}``, plus
    ``summary`` (P scores and the criterion per benchmark) when the tests include the paper's five."""
    checkpoints = load_comparable_checkpoints(models)
    loaded = [load_benchmark(name, find_benchmark_root(name, data_root)) for name in benchmarks]
    dev = resolve_device(device)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress, transient=True) as progress:
        report: dict = {b.name: _evaluate_benchmark(b, checkpoints, tests, dev, progress) for b in loaded}
    if {f"{q}/{g}" for q, g in PAPER_TESTS} <= {f"{q}/{g}" for q, g in tests}:
        report["summary"] = paper_summary(report, benchmarks)
    return report


def paper_summary(report: dict, benchmarks: Sequence[str]) -> dict:
    """P_up / P_comp / P_1 over the benchmarks (equal weights) and the empirical criterion on each.

    The P scores are left out, with the reason, where they are undefined (M(*,*) equal to M(o,o) somewhere).
    """
    heads = [report[name]["headline"] for name in benchmarks]
    pairs = zip(benchmarks, heads, strict=True)
    summary: dict = {"criterion": {name: empirical_criterion(h["new/old"], h["old/old"]) for name, h in pairs}}
    try:
        summary.update(
            compatibility_scores(
                [h["old/old"] for h in heads],
                [h["independent/independent"] for h in heads],
                [h["new/new"] for h in heads],
                [h["new/old"] for h in heads],
            )
        )
    except ValueError as exc:
        summary["p_scores_undefined"] = str(exc)
    return summary


def landmark_table(report: dict) -> Table:
    """One column per benchmark (its headline number), one row per test; P scores in the caption."""
    names = [name for name in report if name != "summary"]
    table = Table(title="Landmark retrieval (query model / gallery model), percent")
    table.add_column("test")
    for name in names:
        table.add_column(f"{name}\n{report[name]['headline_name']}", justify="right")
    for key in report[names[0]]["headline"]:
        table.add_row(key, *(f"{report[name]['headline'][key]:.2f}" for name in names))
    summary = report.get("summary", {})
    if "p_up" in summary:
        table.caption = f"P_up {summary['p_up']:.2f}   P_comp {summary['p_comp']:.2f}   P_1 {summary['p_1']:.2f}"
    elif summary:
        table.caption = f"P scores undefined: {summary['p_scores_undefined']}"
    return table


def print_landmark_report(report: dict, console: Console) -> None:
    console.print(landmark_table(report))
    for name in (n for n in report if n != "summary"):
        for key, result in report[name]["tests"].items():
            if name != "gldv2":
                line = "   ".join(
                    f"{p}: mAP {r['map']:.2f} mP@1/5/10 {r['mp@1']:.2f}/{r['mp@5']:.2f}/{r['mp@10']:.2f}"
                    for p, r in result.items()
                )
            else:
                line = "   ".join(f"{usage} mAP@100 {value:.2f}" for usage, value in result.items())
            console.print(f"{name} {key}: {line}")

"""Landmark retrieval benchmarks (ROxford5k, RParis6k, GLDv2): embed from files, search exactly, score, and the
paper's table over them.

The image sets are too large to decode into memory at once (GLDv2's index is 761,757 photos), so they are
embedded from files (``advbct.evaluation.protocol.embed_files``) and only embeddings are kept. Each model embeds
each side of a benchmark once; the self and cross tests reuse those embeddings. Given old, new and independent
models, the tests are summarised with the paper's headline numbers (Medium mAP for ROxford / RParis, Private
mAP@100 for GLDv2), P_up / P_comp / P_1 over the benchmarks and the criterion on each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from advbct.data.benchmarks import BENCHMARK_NAMES, find_benchmark_root
from advbct.data.gldv2 import USAGES, load_gldv2_retrieval
from advbct.data.images import DataError
from advbct.data.revisited import load_revisited
from advbct.distributed import resolve_device
from advbct.evaluation.compatibility import compatibility_scores
from advbct.evaluation.gldv2 import gldv2_map
from advbct.evaluation.protocol import Box, embed_files
from advbct.evaluation.results import (
    CROSS,
    INDEPENDENT,
    OLD,
    SELF,
    UPGRADE_TESTS,
    PScores,
    compatibility_criterion,
    pair_name,
)
from advbct.evaluation.revisited import revisited_map
from advbct.evaluation.search import exact_search
from advbct.models.checkpoint import ModelMeta, load_comparable_checkpoints
from advbct.models.embedding import EmbeddingModel

Loaded = tuple[EmbeddingModel, ModelMeta]


@dataclass(frozen=True)
class LandmarkBenchmark:
    """Query and gallery image files, a scorer of a (queries x gallery) ranking, and the paper's headline number.

    ``rank_depth`` None means the full ranking (the revisited protocols need every database position).
    """

    name: str
    query_files: list[Path]
    query_boxes: list[Box] | None
    gallery_files: list[Path]
    rank_depth: int | None
    score: Callable[[torch.Tensor], dict]
    headline: Callable[[dict], float]
    headline_name: str


def revisited_benchmark(root: Path, name: str) -> LandmarkBenchmark:
    """ROxford5k or RParis6k from ``root``: queries cropped to their boxes, the full ranking scored by Easy / Medium /
    Hard, Medium mAP the headline."""
    data = load_revisited(root, name)
    return LandmarkBenchmark(
        name=name,
        query_files=data.query_files(),
        query_boxes=data.query_boxes(),
        gallery_files=data.database_files(),
        rank_depth=None,
        score=lambda ranks: revisited_map(ranks, data.gnd),
        headline=lambda result: result["medium"]["map"],
        headline_name="Medium mAP",
    )


def gldv2_benchmark(root: Path, k: int = 100) -> LandmarkBenchmark:
    """GLDv2 retrieval from ``root``: the test photos against the index, mAP@``k`` per usage (public, private),
    private the headline."""
    data = load_gldv2_retrieval(root)

    def score(ranks: torch.Tensor) -> dict:
        return {usage.lower(): gldv2_map(ranks, data.solution[usage], k) for usage in USAGES if data.solution[usage]}

    return LandmarkBenchmark(
        name="gldv2",
        query_files=data.test_files(),
        query_boxes=None,
        gallery_files=data.index_files(),
        rank_depth=k,
        score=score,
        headline=lambda result: result["private"],
        headline_name=f"Private mAP@{k}",
    )


def load_benchmark(name: str, root: Path) -> LandmarkBenchmark:
    """The benchmark ``name`` (one of ``BENCHMARK_NAMES``) from its data in ``root``."""
    return gldv2_benchmark(root) if name == "gldv2" else revisited_benchmark(root, name)


def run_test(
    benchmark: LandmarkBenchmark, query_emb: torch.Tensor, gallery_emb: torch.Tensor, device: torch.device
) -> dict:
    """Score one (query model, gallery model) test: exact search, then the benchmark's metric."""
    depth = gallery_emb.shape[0] if benchmark.rank_depth is None else min(benchmark.rank_depth, gallery_emb.shape[0])
    _, ranks = exact_search(query_emb.to(device), gallery_emb.to(device), depth)
    return benchmark.score(ranks.cpu())


def parse_benchmarks(value: str) -> list[str]:
    """``paper`` (all three) or a comma-separated list of benchmark names."""
    names = list(BENCHMARK_NAMES) if value == "paper" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in BENCHMARK_NAMES]
    if unknown or not names:
        named = ", ".join(unknown) if unknown else repr(value)
        raise DataError(f"unknown benchmark {named}; use {', '.join(BENCHMARK_NAMES)} or paper")
    return names


@dataclass(frozen=True)
class BenchmarkResult:
    """One benchmark's tests: each test's scores as the benchmark defines them (per protocol or usage), and its
    headline number (named ``headline_name``) per test; tests are named ``"query/gallery"``."""

    tests: dict[str, dict]
    headline_name: str
    headline: dict[str, float]

    def to_json(self) -> dict:
        return {"tests": self.tests, "headline_name": self.headline_name, "headline": self.headline}


@dataclass(frozen=True)
class LandmarkSummary:
    """The paper's summary over the benchmarks: the cross criterion M(n,o) > M(o,o) on each, and P_up / P_comp /
    P_1 (benchmarks weigh equally), or why they are undefined (M(*,*) equal to M(o,o) somewhere)."""

    criterion: dict[str, bool]
    scores: PScores | None
    p_scores_undefined: str | None = None

    def to_json(self) -> dict:
        summary: dict = {"criterion": self.criterion}
        if self.scores is not None:
            summary.update(p_up=self.scores.p_up, p_comp=self.scores.p_comp, p_1=self.scores.p_1)
        else:
            summary["p_scores_undefined"] = self.p_scores_undefined
        return summary


@dataclass(frozen=True)
class LandmarkReport:
    """Every benchmark's result by name, and the summary when the tests include the paper's five."""

    benchmarks: dict[str, BenchmarkResult]
    summary: LandmarkSummary | None

    def to_json(self) -> dict:
        report: dict = {name: result.to_json() for name, result in self.benchmarks.items()}
        if self.summary is not None:
            report["summary"] = self.summary.to_json()
        return report


def paper_summary(headlines: dict[str, dict[str, float]]) -> LandmarkSummary:
    """The summary from each benchmark's headline numbers ``{benchmark: {test: number}}``."""
    criterion = {
        name: compatibility_criterion(h[CROSS] - h[OLD], h[SELF] - h[OLD]).cross for name, h in headlines.items()
    }
    heads = list(headlines.values())
    try:
        scores = compatibility_scores(*[[h[test] for h in heads] for test in (OLD, INDEPENDENT, SELF, CROSS)])
    except ValueError as exc:
        return LandmarkSummary(criterion, None, str(exc))
    return LandmarkSummary(criterion, PScores(**scores))


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
) -> BenchmarkResult:
    cache: dict[tuple[str, str], torch.Tensor] = {}

    def embedded(model: str, side: str) -> torch.Tensor:
        if (model, side) not in cache:
            cache[(model, side)] = _embed_side(benchmark, side, model, models[model], device, progress)
        return cache[(model, side)]

    results = {
        pair_name(q, g): run_test(benchmark, embedded(q, "query"), embedded(g, "gallery"), device) for q, g in tests
    }
    headline = {key: benchmark.headline(value) for key, value in results.items()}
    return BenchmarkResult(results, benchmark.headline_name, headline)


def evaluate_benchmarks(
    benchmarks: Sequence[str],
    models: dict[str, Path],
    tests: Sequence[tuple[str, str]],
    data_root: str | None = None,
    device: str = "auto",
    show_progress: bool = True,
) -> LandmarkReport:
    """Every requested (query model, gallery model) test on each benchmark, and the paper's summary when the tests
    include its five."""
    checkpoints = load_comparable_checkpoints(models)
    loaded = [load_benchmark(name, find_benchmark_root(name, data_root)) for name in benchmarks]
    dev = resolve_device(device)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress, transient=True) as progress:
        results = {b.name: _evaluate_benchmark(b, checkpoints, tests, dev, progress) for b in loaded}
    named = {pair_name(q, g) for q, g in tests}
    summary = paper_summary({n: r.headline for n, r in results.items()}) if set(UPGRADE_TESTS) <= named else None
    return LandmarkReport(results, summary)

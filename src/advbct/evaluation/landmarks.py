"""Landmark retrieval benchmarks (ROxford5k, RParis6k, GLDv2): embed from files, search exactly, score.

The image sets are too large to decode into memory at once (GLDv2's index is 761,757 photos), so they are
embedded from files (``advbct.evaluation.protocol.embed_files``) and only embeddings are kept. Each model embeds
each side of a benchmark once; the self and cross tests reuse those embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from advbct.data.gldv2 import USAGES, load_gldv2_retrieval
from advbct.data.revisited import load_revisited
from advbct.evaluation.gldv2 import gldv2_map
from advbct.evaluation.protocol import Box
from advbct.evaluation.revisited import revisited_map
from advbct.evaluation.search import exact_search


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
    return gldv2_benchmark(root) if name == "gldv2" else revisited_benchmark(root, name)


def run_test(
    benchmark: LandmarkBenchmark, query_emb: torch.Tensor, gallery_emb: torch.Tensor, device: torch.device
) -> dict:
    """Score one (query model, gallery model) test: exact search, then the benchmark's metric."""
    depth = gallery_emb.shape[0] if benchmark.rank_depth is None else min(benchmark.rank_depth, gallery_emb.shape[0])
    _, ranks = exact_search(query_emb.to(device), gallery_emb.to(device), depth)
    return benchmark.score(ranks.cpu())

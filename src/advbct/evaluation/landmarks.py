"""Landmark retrieval benchmarks (ROxford5k, RParis6k, GLDv2): embed from files, search exactly, score.

The image sets are too large to decode into memory at once (GLDv2's index is 761,757 photos), so images are
decoded in batches by a thread pool while the model embeds the previous batch, and only embeddings are kept.
Each model embeds each side of a benchmark once; the self and cross tests reuse those embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from advbct.data.batches import Preprocessing, normalise
from advbct.data.gldv2 import USAGES, load_gldv2_retrieval
from advbct.data.images import decode_image
from advbct.data.revisited import load_revisited
from advbct.evaluation.gldv2 import gldv2_map
from advbct.evaluation.revisited import revisited_map
from advbct.evaluation.search import exact_search

Box = tuple[float, float, float, float]


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


def _decoded_batches(
    files: Sequence[Path], boxes: Sequence[Box] | None, size: int, batch_size: int, workers: int
) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, size, size) batches; the next batch decodes while the caller works on the current one."""

    def decode(index: int) -> np.ndarray:
        return decode_image(files[index], size, box=None if boxes is None else boxes[index], whole=True)

    starts = range(0, len(files), batch_size)
    with ThreadPoolExecutor(workers) as pool:

        def submit(start: int) -> list:
            return [pool.submit(decode, i) for i in range(start, min(start + batch_size, len(files)))]

        pending = submit(starts[0]) if starts else []
        for position in range(len(starts)):
            current = pending
            if position + 1 < len(starts):
                pending = submit(starts[position + 1])
            arrays = np.stack([future.result() for future in current])
            yield torch.from_numpy(np.ascontiguousarray(arrays.transpose(0, 3, 1, 2)))


@torch.no_grad()
def embed_files(
    model: nn.Module,
    prep: Preprocessing,
    files: Sequence[Path],
    device: torch.device,
    boxes: Sequence[Box] | None = None,
    batch_size: int = 64,
    workers: int = 4,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(N, d) float32 embeddings of image files (whole images, or the given boxes), at the model's input size."""
    if boxes is not None and len(boxes) != len(files):
        raise ValueError(f"{len(boxes)} boxes for {len(files)} files")
    model = model.to(device).eval()
    out = []
    for batch in _decoded_batches(files, boxes, prep.image_size, batch_size, workers):
        images = normalise(batch.to(device, non_blocking=True), prep)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(images).float().cpu())
        if on_batch is not None:
            on_batch(batch.shape[0])
    return torch.cat(out) if out else torch.empty(0, 0)


def run_test(
    benchmark: LandmarkBenchmark, query_emb: torch.Tensor, gallery_emb: torch.Tensor, device: torch.device
) -> dict:
    """Score one (query model, gallery model) test: exact search, then the benchmark's metric."""
    depth = gallery_emb.shape[0] if benchmark.rank_depth is None else min(benchmark.rank_depth, gallery_emb.shape[0])
    _, ranks = exact_search(query_emb.to(device), gallery_emb.to(device), depth)
    return benchmark.score(ranks.cpu())

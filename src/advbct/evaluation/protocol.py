"""Self/cross test protocol: embed one image set with several models, score every (query, gallery) pair."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from advbct.data.batches import Preprocessing, normalise
from advbct.distributed import current_world, gather_rows
from advbct.evaluation.metrics import label_retrieval_metrics
from advbct.evaluation.results import TestResult, pair_name

Box = tuple[float, float, float, float]


def ready_for_inference(model: nn.Module, device: torch.device, channels_last: bool = False) -> nn.Module:
    """``model`` in eval mode on ``device``, its 4-D weights channels_last when asked, converted in place only where
    it is not so already. ``Module.to`` rewrites every parameter in place even when nothing changes, and a forward
    pass running on the same model in another thread (the service's searches beside its backfill) may read a
    parameter half rewritten and return all-zero embeddings. A model already in the wanted form is left untouched,
    so a shared one is converted once, before it is shared."""
    if any(module.training for module in model.modules()):
        model.eval()
    params = list(model.parameters())
    if any(p.device.type != device.type or device.index not in (None, p.device.index) for p in params):
        model.to(device)
    if channels_last and any(p.ndim == 4 and not p.is_contiguous(memory_format=torch.channels_last) for p in params):
        model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def embed_images(
    model: nn.Module,
    images: torch.Tensor,
    prep: Preprocessing,
    device: torch.device,
    batch_size: int = 1024,
    channels_last: bool = True,
) -> torch.Tensor:
    """Embeddings (N, d) in float32 on the CPU, in eval mode, with bf16 autocast on CUDA.

    Under torchrun each rank embeds every world-th image and the rows are gathered, so every rank returns all N.
    """
    if images.shape[-1] != prep.image_size or images.shape[-2] != prep.image_size:
        raise ValueError(
            f"images are {tuple(images.shape[-2:])}, the model expects {prep.image_size}x{prep.image_size}"
        )
    world = current_world()
    model = ready_for_inference(model, device, channels_last)
    own = images[world.rank :: world.size]
    out = []
    for start in range(0, own.shape[0], batch_size):
        batch = normalise(own[start : start + batch_size].to(device, non_blocking=True), prep, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(batch).float())
    emb = torch.cat(out) if out else torch.empty(0, model.embedding_dim, device=device)
    return gather_rows(emb, world, images.shape[0]).cpu()


def _decoded_batches(
    files: Sequence[Path], boxes: Sequence[Box] | None, prep: Preprocessing, batch_size: int, workers: int, whole: bool
) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, size, size) batches framed as ``prep`` records; the next batch decodes while the caller works
    on the current one."""

    def decode(index: int) -> np.ndarray:
        return prep.decode(files[index], box=None if boxes is None else boxes[index], whole=whole)

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
    whole: bool = True,
) -> torch.Tensor:
    """(N, d) float32 embeddings of image files at the model's input size, on the CPU, in eval mode.

    Images are decoded by a thread pool, the next batch while the model embeds the current one. ``whole``: the
    whole image (or its box) is resized to the square, as retrieval benchmarks define them; ``False``
    centre-crops, the classification convention.
    """
    if boxes is not None and len(boxes) != len(files):
        raise ValueError(f"{len(boxes)} boxes for {len(files)} files")
    model = ready_for_inference(model, device)
    out = []
    for batch in _decoded_batches(files, boxes, prep, batch_size, workers, whole):
        images = normalise(batch.to(device, non_blocking=True), prep)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(images).float().cpu())
        if on_batch is not None:
            on_batch(batch.shape[0])
    return torch.cat(out) if out else torch.empty(0, 0)


def evaluate_pairs(
    embeddings: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    pairs: Iterable[tuple[str, str]],
    device: torch.device | str | None = None,
) -> dict[str, TestResult]:
    """``{"query/gallery": result}``: each test image queries the rest of the set (itself excluded).

    ``device``: where the rankings are computed (each embedding is moved there once). Every pair sorts a full
    (test set x test set) score matrix, which a GPU does far faster than a CPU, and a full table has dozens of
    pairs.
    """
    pairs = list(pairs)
    used = {name for pair in pairs for name in pair}
    placed = {name: embeddings[name].to(device) if device is not None else embeddings[name] for name in used}
    labels = labels.to(device) if device is not None else labels

    def scored(query: str, gallery: str) -> TestResult:
        return TestResult(label_retrieval_metrics(placed[query], labels, placed[gallery], labels, True))

    return {pair_name(q, g): scored(q, g) for q, g in pairs}

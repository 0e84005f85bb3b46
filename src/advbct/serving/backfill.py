"""Background backfill: re-embed every gallery item that an older (or rolled-back) generation embedded.

The database is the only record of progress: an item is done exactly when Milvus holds it at the target
generation. A batch is embedded and then written with one upsert by primary key, so a worker killed at any point
(even ``kill -9``) leaves each item either as it was or re-embedded, never lost or doubled, and a restarted worker
simply asks Milvus again which items are still stale. Workers split a large gallery by id bucket
(``bucket % workers == worker``), so N processes never touch the same item.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from advbct.data.images import DataError
from advbct.serving.models import Embedder
from advbct.serving.store import BUCKETS, GalleryStore


@dataclass
class BackfillProgress:
    """What a running backfill reports: items re-embedded by this run, those left, and the recent rate."""

    target_generation: int
    done: int = 0
    remaining: int = 0
    items_per_s: float = 0.0
    state: str = "idle"
    started_at: float = field(default_factory=time.time)
    failed: list[str] = field(default_factory=list)


def shard_buckets(worker: int, workers: int) -> list[int] | None:
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} is not in 0..{workers - 1}")
    return None if workers == 1 else [b for b in range(BUCKETS) if b % workers == worker]


def resolve_ref(image_root: Path, ref: str) -> Path:
    """An item's image file: a path inside the image root (anything pointing outside it is refused)."""
    root = image_root.resolve()
    path = (root / ref).resolve()
    if root != path and root not in path.parents:
        raise DataError(f"image reference {ref!r} points outside the image root {image_root}")
    return path


def run_backfill(
    store: GalleryStore,
    embedder: Embedder,
    target_generation: int,
    image_root: Path,
    batch_size: int = 256,
    worker: int = 0,
    workers: int = 1,
    stop: threading.Event | None = None,
    pause: threading.Event | None = None,
    progress: BackfillProgress | None = None,
    on_batch: Callable[[BackfillProgress], None] | None = None,
) -> BackfillProgress:
    """Re-embed this worker's stale items in batches until none is left (or ``stop`` is set)."""
    if embedder.dim != store.dim:
        raise DataError(f"the model embeds to {embedder.dim} dimensions, the gallery holds {store.dim}")
    buckets = shard_buckets(worker, workers)
    progress = progress or BackfillProgress(target_generation)
    progress.state = "running"
    stale_filter = f"generation != {target_generation}"
    if buckets is not None:
        stale_filter += f" and bucket in {buckets}"
    window_start, window_done = time.perf_counter(), 0
    while not (stop is not None and stop.is_set()):
        if pause is not None and pause.is_set():
            progress.state = "paused"
            time.sleep(0.05)
            continue
        progress.state = "running"
        rows = store.stale(target_generation, batch_size, buckets)
        if not rows:
            break
        ids = [int(r["id"]) for r in rows]
        refs = [r["ref"] for r in rows]
        vectors = embedder.embed_files([resolve_ref(image_root, ref) for ref in refs])
        alive = store.existing(ids)  # an item deleted meanwhile must not come back
        keep = [i for i, item in enumerate(ids) if item in alive]
        if keep:
            store.replace([ids[i] for i in keep], [refs[i] for i in keep], vectors[keep], target_generation)
        progress.done += len(keep)
        window_done += len(keep)
        elapsed = time.perf_counter() - window_start
        progress.items_per_s = window_done / elapsed if elapsed > 0 else 0.0
        progress.remaining = store.count(stale_filter)
        if on_batch is not None:
            on_batch(progress)
    progress.remaining = store.count(stale_filter)
    progress.state = "stopped" if progress.remaining else "finished"
    return progress

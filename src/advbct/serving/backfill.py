"""Background backfill: bring every gallery item to the target generation, re-embedding it with the target's
model, or, where the item kept the target's vector when it was last re-embedded (a rollback, or a roll-forward
after one), swapping that vector back without a model.

The database is the only record of progress: an item is done exactly when Milvus holds it at the target
generation. A batch is embedded and then written with one upsert by primary key, so a worker killed at any point
(even ``kill -9``) leaves each item either as it was or re-embedded, never lost or doubled, and a restarted worker
simply asks Milvus again which items are still stale. Workers split a large gallery by id bucket
(``bucket % workers == worker``), so N processes never touch the same item.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from advbct.data.images import DataError
from advbct.serving.models import Embedder
from advbct.serving.store import BUCKETS, GalleryStore

# Batches written between flushes: unflushed rows slow searches a little (Milvus Lite scans them one by one),
# a flush per batch slows the backfill more.
FLUSH_EVERY = 4


@dataclass
class BackfillProgress:
    """What a running backfill reports: items brought to the target by this run (re-embedded or restored), those
    left, and the recent rate."""

    target_generation: int
    done: int = 0
    remaining: int | None = 0  # None while the starting count is still running
    items_per_s: float = 0.0
    state: str = "idle"
    order: str = "storage"  # the order policy the run follows
    started_at: float = field(default_factory=time.time)
    failed: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"id", "ref", "reason"}: items that could not be decoded

    @property
    def skipped_ids(self) -> set[int]:
        return {int(item["id"]) for item in self.skipped}


def embed_decodable(
    embedder: Embedder, root: ImageRoot, ids: list[int], refs: list[str], progress: BackfillProgress
) -> tuple[list[int], list[str], np.ndarray]:
    """The batch embedded, less any item whose file is missing or cannot be decoded: those are recorded in
    ``progress.skipped`` (their old vectors stay searchable) instead of stopping the whole backfill.

    Only a batch that failed is decoded again one file at a time, to find the culprits."""
    try:
        return ids, refs, embedder.embed_files([root.resolve(ref) for ref in refs])
    except DataError:
        pass
    keep: list[int] = []
    for index, (item_id, ref) in enumerate(zip(ids, refs, strict=True)):
        try:
            embedder.prep.decode(root.resolve(ref))
            keep.append(index)
        except (DataError, OSError) as exc:
            progress.skipped.append({"id": item_id, "ref": ref, "reason": str(exc)})
    ids, refs = [ids[i] for i in keep], [refs[i] for i in keep]
    vectors = embedder.embed_files([root.resolve(ref) for ref in refs]) if ids else np.zeros((0, embedder.dim))
    return ids, refs, vectors


def split_restorable(rows: list[dict], target_generation: int) -> tuple[list[int], list[dict]]:
    """Listed stale items split into the ids that kept the target generation's vector (restored by a swap, no
    model needed) and the rows to re-embed.

    The writes (``GalleryStore.replace`` and ``restore``) check each item again first: an item deleted meanwhile
    must not come back, and one already at the target is not written or counted again (a Milvus server's listing
    may lag behind writes it has already acknowledged, and a restarted job may list an item whose write reached the
    store just before the previous job was killed)."""
    restorable = [int(row["id"]) for row in rows if int(row["previous_generation"]) == target_generation]
    return restorable, [row for row in rows if int(row["previous_generation"]) != target_generation]


def shard_buckets(worker: int, workers: int) -> list[int] | None:
    """The id buckets worker ``worker`` of ``workers`` owns (``None``: a single worker owns the whole gallery)."""
    if workers < 1 or workers > BUCKETS:
        raise DataError(f"--workers {workers}: the gallery splits into 1 to {BUCKETS} workers")
    if not 0 <= worker < workers:
        raise DataError(f"--worker {worker} is not in 0..{workers - 1} (--workers {workers})")
    return None if workers == 1 else [b for b in range(BUCKETS) if b % workers == worker]


class ImageRoot:
    """Item references resolved inside one image root; a reference that points outside it (``..``, an absolute
    path, a symbolic link leading out) is refused.

    Each folder is resolved once and each file then costs one symlink check: a full ``Path.resolve`` per item
    walks every path component in Python, a large share of a backfill's time.
    """

    def __init__(self, root: Path):
        self.given = Path(root)
        self.root = self.given.resolve()
        self._folders: dict[Path, Path] = {}

    def resolve(self, ref: str) -> Path:
        """The file ``ref`` names; a :class:`DataError` where it lies outside the image root."""
        relative = Path(ref)
        if relative.name in ("", ".", ".."):
            path = (self.root / relative).resolve()
        else:
            folder = self._folders.get(relative.parent)
            if folder is None:
                folder = self._folders[relative.parent] = (self.root / relative.parent).resolve()
            path = folder / relative.name
            if path.is_symlink():
                path = path.resolve()
        if path != self.root and self.root not in path.parents:
            raise DataError(f"image reference {ref!r} points outside the image root {self.given}")
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
    page_size: int | None = None,
    order: Sequence[int] | None = None,
    limit: int | None = None,
) -> BackfillProgress:
    """Re-embed this worker's stale items in batches until none is left (or ``stop`` is set).

    Stale items are listed a page (``page_size`` items, by default the most the store returns at once) at a time,
    because each filtered query scans the collection; writer threads check and upsert earlier batches while the
    next is decoded and embedded (several on a server, whose strongly consistent check waits for a time tick).
    ``order``: item ids to re-embed first, in that order (those not stale are passed over); the rest follow in
    storage order. ``limit``: stop after this many items, leaving the rest for a later run.
    """
    if embedder.dim != store.dim:
        raise DataError(f"the model embeds to {embedder.dim} dimensions, the gallery holds {store.dim}")
    buckets = shard_buckets(worker, workers)
    root = ImageRoot(image_root)
    progress = progress or BackfillProgress(target_generation)
    progress.state = "running"
    stale_filter = f"generation != {target_generation}"
    if buckets is not None:
        stale_filter += f" and bucket in {buckets}"
    # A filtered count scans the whole collection (slow on a large Milvus Lite gallery). When the first page
    # of the storage-order listing holds every stale item its length is the count; otherwise the count runs beside
    # the work. What is left is that count minus what this run wrote.
    initial: list[int] = []
    page_size = page_size or store.page_limit
    pages = _stale_pages(store, target_generation, page_size, buckets, order, progress)
    page = next(pages)

    def count_stale() -> None:
        initial.append(store.count(stale_filter))
        progress.remaining = max(0, initial[0] - progress.done)

    counter = None
    if order is None and len(page) < page_size:
        initial.append(len(page))
        progress.remaining = len(page)
    else:
        progress.remaining = None
        counter = threading.Thread(target=count_stale, daemon=True)
        counter.start()
    started = time.perf_counter()
    writers = store.concurrent_writes
    writes: queue.Queue = queue.Queue(maxsize=writers + 1)
    written = [0]
    failure: list[BaseException] = []
    counting = threading.Lock()

    def write() -> None:
        while (job := writes.get()) is not None:
            try:
                with counting:
                    written[0] += 1
                    flush = written[0] % FLUSH_EVERY == 0
                keep = job(flush=flush)
            except BaseException as exc:  # handed to the main loop, which stops and re-raises
                failure.append(exc)
                writes.task_done()
                continue
            with counting:
                progress.done += len(keep)
                if initial:
                    progress.remaining = max(0, initial[0] - progress.done)
                progress.items_per_s = progress.done / max(time.perf_counter() - started, 1e-9)
                if on_batch is not None:
                    on_batch(progress)
            writes.task_done()

    threads = [threading.Thread(target=write, daemon=True) for _ in range(writers)]
    for thread in threads:
        thread.start()
    exhausted = False
    queued = 0
    try:
        while not (stop is not None and stop.is_set()) and not failure:
            if not page:
                exhausted = True
                break
            if limit is not None:
                page = page[: max(0, limit - queued)]
                if not page:
                    break
            for offset in range(0, len(page), batch_size):
                while pause is not None and pause.is_set() and not (stop is not None and stop.is_set()):
                    progress.state = "paused"
                    time.sleep(0.05)
                progress.state = "running"
                if (stop is not None and stop.is_set()) or failure:
                    break
                rows = page[offset : offset + batch_size]
                for job in _batch_writes(store, embedder, root, target_generation, rows, progress):
                    writes.put(job)
                queued += len(rows)
            writes.join()  # the next page must not list items of this one that are still being written
            page = next(pages)
    finally:
        for _ in threads:
            writes.put(None)
        for thread in threads:
            thread.join()
    if counter is not None:
        counter.join()
    store.flush()
    if failure:
        raise failure[0]
    progress.remaining = 0 if exhausted else store.count(stale_filter) - len(progress.skipped)
    progress.state = "finished" if exhausted else "stopped"
    return progress


def _batch_writes(
    store: GalleryStore, embedder: Embedder, root: ImageRoot, target: int, rows: list[dict], progress: BackfillProgress
) -> list[Callable[..., list[int]]]:
    """A batch's writes, each taking ``flush`` and answering the ids it wrote: the restorations, then the
    re-embeddings of the items that can be decoded."""
    restorable, rest = split_restorable(rows, target)
    jobs: list[Callable[..., list[int]]] = []
    if restorable:
        jobs.append(partial(store.restore, restorable, target))
    if rest:
        ids, refs, vectors = embed_decodable(embedder, root, [int(r["id"]) for r in rest], [r["ref"] for r in rest],
                                             progress)  # fmt: skip
        if ids:
            jobs.append(partial(store.replace, ids, refs, vectors, target))
    return jobs


def _stale_pages(
    store: GalleryStore,
    target_generation: int,
    page_size: int,
    buckets: list[int] | None,
    order: Sequence[int] | None,
    progress: BackfillProgress,
) -> Iterator[list[dict]]:
    """Pages of stale items, each listed only once the page before it is written: first those of ``order`` (in
    that order, this worker's buckets only), then whatever the store still lists as stale, less the items skipped
    as undecodable. Ends with an empty page."""
    if order is not None:
        wanted = [int(i) for i in order if buckets is None or int(i) % BUCKETS in buckets]
        for start in range(0, len(wanted), page_size):
            ids = wanted[start : start + page_size]
            by_id = {int(row["id"]): row for row in store.get(ids) if int(row["generation"]) != target_generation}
            skipped = progress.skipped_ids
            page = [by_id[i] for i in ids if i in by_id and i not in skipped]
            if page:
                yield page
    while True:
        yield store.stale(target_generation, page_size, buckets, exclude=progress.skipped_ids)

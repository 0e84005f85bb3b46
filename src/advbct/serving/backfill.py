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

# Writes (one upsert each: a batch's restored items and its re-embedded ones are separate writes) between flushes:
# unflushed rows slow searches a little (Milvus Lite scans them one by one), a flush per write slows the backfill
# more.
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
    progress = progress or BackfillProgress(target_generation)
    progress.state = "running"
    stale_filter = f"generation != {target_generation}"
    if buckets is not None:
        stale_filter += f" and bucket in {buckets}"
    page_size = page_size or store.page_limit
    pages = _stale_pages(store, target_generation, page_size, buckets, order, progress)
    page = next(pages)
    remaining = _StaleCount(store, stale_filter, progress)
    remaining.start(page, exact=order is None and len(page) < page_size)
    writers = _WriterPool(store.concurrent_writes, progress, remaining, on_batch)
    feed = _Feed(store, embedder, ImageRoot(image_root), target_generation, batch_size, progress, stop, pause)
    try:
        exhausted = feed.run(page, pages, writers, limit)
    finally:
        writers.close()
    remaining.join()
    store.flush()
    if writers.failure:
        raise writers.failure[0]
    progress.remaining = 0 if exhausted else store.count(stale_filter) - len(progress.skipped)
    progress.state = "finished" if exhausted else "stopped"
    return progress


class _StaleCount:
    """How many items were stale when the run began, so ``remaining`` can be that minus what this run wrote.

    A filtered count scans the whole collection (slow on a large Milvus Lite gallery). When the first page of
    the storage-order listing holds every stale item its length is the count; otherwise the count runs beside the
    work and ``remaining`` is unknown until it ends."""

    def __init__(self, store: GalleryStore, stale_filter: str, progress: BackfillProgress):
        self.store, self.stale_filter, self.progress = store, stale_filter, progress
        self.initial: int | None = None
        self._thread: threading.Thread | None = None

    def start(self, first_page: list[dict], exact: bool) -> None:
        if exact:
            self.initial = self.progress.remaining = len(first_page)
            return
        self.progress.remaining = None
        self._thread = threading.Thread(target=self._count, daemon=True)
        self._thread.start()

    def _count(self) -> None:
        self.initial = self.store.count(self.stale_filter)
        self.progress.remaining = max(0, self.initial - self.progress.done)

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


class _WriterPool:
    """Threads that run queued write jobs (check, then upsert) while the caller decodes and embeds the next batch;
    a failure is kept for the caller, which stops feeding and re-raises it."""

    def __init__(
        self,
        size: int,
        progress: BackfillProgress,
        remaining: _StaleCount,
        on_batch: Callable[[BackfillProgress], None] | None,
    ):
        self.progress, self.remaining, self.on_batch = progress, remaining, on_batch
        self.jobs: queue.Queue = queue.Queue(maxsize=size + 1)
        self.failure: list[BaseException] = []
        self._written = 0
        self._counting = threading.Lock()
        self._started = time.perf_counter()
        self._threads = [threading.Thread(target=self._write, daemon=True) for _ in range(size)]
        for thread in self._threads:
            thread.start()

    def _write(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                with self._counting:
                    self._written += 1
                    flush = self._written % FLUSH_EVERY == 0
                keep = job(flush=flush)
            except BaseException as exc:  # handed to the caller, which stops and re-raises
                self.failure.append(exc)
                self.jobs.task_done()
                continue
            with self._counting:
                self._count(len(keep))
            self.jobs.task_done()

    def _count(self, written: int) -> None:
        progress = self.progress
        progress.done += written
        if self.remaining.initial is not None:
            progress.remaining = max(0, self.remaining.initial - progress.done)
        progress.items_per_s = progress.done / max(time.perf_counter() - self._started, 1e-9)
        if self.on_batch is not None:
            self.on_batch(progress)

    def close(self) -> None:
        for _ in self._threads:
            self.jobs.put(None)
        for thread in self._threads:
            thread.join()


@dataclass
class _Feed:
    """Pages of stale items cut into batches, each decoded and embedded here and handed to the writers; honours
    ``pause`` between batches and ``stop`` at any batch."""

    store: GalleryStore
    embedder: Embedder
    root: ImageRoot
    target: int
    batch_size: int
    progress: BackfillProgress
    stop: threading.Event | None
    pause: threading.Event | None

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def run(self, page: list[dict], pages: Iterator[list[dict]], writers: _WriterPool, limit: int | None) -> bool:
        """Feed pages until none is left (returns True), or until stopped, failed or ``limit`` (False)."""
        queued = 0
        while not self.stopped() and not writers.failure:
            if not page:
                return True
            if limit is not None:
                page = page[: max(0, limit - queued)]
                if not page:
                    return False
            queued += self._feed_page(page, writers)
            writers.jobs.join()  # the next page must not list items of this one that are still being written
            page = next(pages)
        return False

    def _feed_page(self, page: list[dict], writers: _WriterPool) -> int:
        queued = 0
        for offset in range(0, len(page), self.batch_size):
            while self.pause is not None and self.pause.is_set() and not self.stopped():
                self.progress.state = "paused"
                time.sleep(0.05)
            self.progress.state = "running"
            if self.stopped() or writers.failure:
                break
            rows = page[offset : offset + self.batch_size]
            for job in _batch_writes(self.store, self.embedder, self.root, self.target, rows, self.progress):
                writers.jobs.put(job)
            queued += len(rows)
        return queued


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

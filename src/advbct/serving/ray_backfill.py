"""The backfill on Ray Data, for a gallery that outgrows one machine: ``advbct backfill --engine ray``.

The driver lists stale items from the gallery in rounds of id-ordered shards (each shard a block of consecutive
ids); CPU tasks decode the images, an actor pool of the new model embeds them (a GPU per actor where the cluster
has GPUs), and the driver writes the vectors back through ``GalleryStore`` as they stream out of the pipeline. A
Milvus Lite file opens in one process only, so writing from the driver is what lets one code path serve Lite and a
Milvus cluster alike; on a server the driver pipelines its writes over several threads, as the single-process
backfill does.

The guarantees are the single-process backfill's, because the write is the same: the database is the only record
of progress, each batch is checked (still stored, still stale) and upserted by primary key, so a job killed at any
point (driver or workers) leaves each item either as it was or re-embedded, and a restarted job lists what is still
stale. Undecodable images are skipped and listed, their old vectors left searchable.

Ray is an optional dependency (``pip install 'advbct[ray]'``), imported only when this engine runs.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advbct.data.batches import Preprocessing
from advbct.data.images import DataError
from advbct.models.checkpoint import read_checkpoint, read_meta
from advbct.serving.backfill import FLUSH_EVERY, BackfillProgress, ImageRoot, split_restorable
from advbct.serving.registry import Generation
from advbct.serving.store import GalleryStore

RAY_HINT = "--engine ray needs Ray, an optional extra: pip install 'advbct[ray]'"


@dataclass(frozen=True)
class RayPlan:
    """How the job is shared out. ``None`` leaves a choice to what the cluster holds: one actor per GPU where it has
    GPUs (``gpus_per_actor`` 1), otherwise one CPU actor per core less one (the driver's writer)."""

    address: str | None = None  # None: a local Ray for this machine's cores (or the one this process already runs)
    actors: int | None = None
    gpus_per_actor: float | None = None
    batch_size: int = 256
    shard_size: int = 1024  # items per block: a run of consecutive ids that one task decodes
    round_size: int = 65_536  # items listed per round: what the driver holds in memory at once


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or a one-line install hint."""
    try:
        import ray
        import ray.data  # the extra, not only the core
    except ImportError:
        raise DataError(RAY_HINT) from None
    return ray


# A local Ray waits a fixed time for its GCS and raylet to come up; on a busy machine that can run out, and a new
# start usually succeeds.
LOCAL_START_ATTEMPTS = 3


def connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at ``address``, or start a local Ray for this machine's cores; whether this call started
    it (and so shuts it down). A Ray this process already runs is used as it is."""
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    where = address or "this machine"
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            if address is None:
                ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), **quiet)
            else:
                ray.init(address=address, **quiet)
            break
        except Exception as exc:  # Ray's start-up failures come as bare Exception, RuntimeError or TimeoutError
            ray.shutdown()
            if address is not None or attempt == LOCAL_START_ATTEMPTS:
                raise DataError(f"cannot start or reach Ray at {where}: {str(exc).splitlines()[0]}") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the CLI reports progress itself, a line per written batch
    return True


def decode_batch(batch: dict[str, np.ndarray], root: str, prep: Preprocessing) -> dict[str, np.ndarray]:
    """A CPU task: the batch's images decoded (uint8, N x size x size x 3, framed by the model's recorded
    preprocessing as the single-process backfill decodes them). An item that cannot be decoded keeps a blank
    image and its reason, so the driver can list it; its id stays in the stream rather than vanishing without
    trace."""
    images = ImageRoot(Path(root))
    refs = [str(ref) for ref in batch["ref"]]
    pixels = np.zeros((len(refs), prep.image_size, prep.image_size, 3), dtype=np.uint8)
    reasons = [""] * len(refs)
    for index, ref in enumerate(refs):
        try:
            pixels[index] = prep.decode(images.resolve(ref))
        except (DataError, OSError) as exc:
            reasons[index] = str(exc)
    return {"id": batch["id"], "ref": np.asarray(refs, dtype=object), "image": pixels,
            "reason": np.asarray(reasons, dtype=object)}  # fmt: skip


class EmbedActor:
    """One member of the actor pool: the new model, loaded once from the checkpoint's bytes (shipped through the
    object store, so worker machines need no copy of the registry's files), embedding decoded batches."""

    def __init__(self, checkpoint: Any, device: str):
        import ray

        from advbct.serving.models import Embedder

        data = ray.get(checkpoint) if isinstance(checkpoint, ray.ObjectRef) else checkpoint
        with tempfile.TemporaryDirectory(prefix="advbct-ray-") as folder:
            path = Path(folder) / "model.pt"
            path.write_bytes(data)
            self.embedder = Embedder(path, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = np.asarray([reason == "" for reason in batch["reason"]], dtype=bool)
        vectors = np.zeros((len(decoded), self.embedder.dim), dtype=np.float32)
        if decoded.any():
            vectors[decoded] = self.embedder.embed_arrays(np.asarray(batch["image"])[decoded])
        return {"id": batch["id"], "ref": batch["ref"], "reason": batch["reason"], "vector": vectors}


def actor_resources(ray: Any, plan: RayPlan) -> tuple[int, float]:
    """(actors, GPUs per actor) from the plan, or from the cluster's resources where the plan leaves them open."""
    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    per_actor = plan.gpus_per_actor if plan.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if per_actor < 0 or (per_actor > 0 and per_actor > gpus):
        raise DataError(f"--gpus-per-actor {per_actor:g}: the Ray cluster has {gpus:g} GPUs")
    actors = plan.actors
    if actors is None:
        actors = int(gpus // per_actor) if per_actor else max(1, int(cpus) - 1)
    if actors < 1:
        raise DataError(f"--actors {actors}: at least one actor embeds")
    return actors, per_actor


def round_dataset(ray: Any, rows: list[dict], prep: Preprocessing, root: Path, plan: RayPlan, model: Any) -> Any:
    """One round's pipeline: its rows in shards of consecutive ids -> decode tasks -> the embedding actor pool.

    Where the actors take no GPU, Ray fuses the decode step into the actors (both are CPU work); with GPUs the
    decode tasks run apart, on any node's CPUs, and feed the GPU actors."""
    actors, gpus = actor_resources(ray, plan)
    blocks = max(1, math.ceil(len(rows) / plan.shard_size))
    dataset = ray.data.from_items(rows, override_num_blocks=blocks)
    dataset = dataset.map_batches(decode_batch, batch_size=plan.batch_size, batch_format="numpy", num_cpus=1,
                                  fn_kwargs={"root": str(root), "prep": prep})  # fmt: skip
    return dataset.map_batches(
        EmbedActor, batch_size=plan.batch_size, batch_format="numpy", num_cpus=1, num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"checkpoint": model, "device": "cuda" if gpus else "cpu"},
    )  # fmt: skip


class DriverWriter:
    """The driver's writes: each embedded batch checked and upserted by ``GalleryStore.replace``, and items that
    kept the target's vector restored by ``GalleryStore.restore`` (the single-process backfill's writes), up to
    ``store.concurrent_writes`` at once, and counted into ``progress`` in this thread."""

    def __init__(self, store: GalleryStore, target: int, progress: BackfillProgress, initial: int,
                 on_batch: Callable[[BackfillProgress], None] | None) -> None:  # fmt: skip
        self.store, self.target, self.progress, self.initial, self.on_batch = store, target, progress, initial, on_batch
        self.pool = ThreadPoolExecutor(store.concurrent_writes, thread_name_prefix="advbct-ray-writer")
        self.pending: deque[Future] = deque()
        self.started = time.perf_counter()
        self.batches = 0

    def write(self, batch: dict[str, np.ndarray]) -> None:
        """Hand an embedded batch's decodable items to a writer thread; list the undecodable ones as skipped."""
        decoded = np.asarray([reason == "" for reason in batch["reason"]], dtype=bool)
        for item_id, ref, reason in zip(batch["id"], batch["ref"], batch["reason"], strict=True):
            if reason:
                self.progress.skipped.append({"id": int(item_id), "ref": str(ref), "reason": str(reason)})
        ids = [int(i) for i in np.asarray(batch["id"])[decoded]]
        if not ids:
            return
        refs = [str(r) for r in np.asarray(batch["ref"])[decoded]]
        vectors = np.asarray(batch["vector"])[decoded]
        self._submit(self.store.replace, ids, refs, vectors, self.target)

    def restore(self, ids: list[int]) -> None:
        """Items that kept the target's vector: swapped back, no model needed."""
        if ids:
            self._submit(self.store.restore, ids, self.target)

    def _submit(self, write: Callable[..., list[int]], *args: Any) -> None:
        self.batches += 1
        self.pending.append(self.pool.submit(write, *args, flush=self.batches % FLUSH_EVERY == 0))
        while len(self.pending) > self.store.concurrent_writes:
            self._count(self.pending.popleft())

    def drain(self) -> None:
        """Wait for every write handed over (the next round must not list items still being written)."""
        while self.pending:
            self._count(self.pending.popleft())

    def _count(self, future: Future) -> None:
        progress = self.progress
        progress.done += len(future.result())
        progress.remaining = max(0, self.initial - progress.done)
        progress.items_per_s = progress.done / max(time.perf_counter() - self.started, 1e-9)
        if self.on_batch is not None:
            self.on_batch(progress)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def stale_rounds(
    store: GalleryStore, target: int, plan: RayPlan, order: Sequence[int] | None, progress: BackfillProgress
) -> Iterator[tuple[list[dict], bool]]:
    """(rows, ordered) rounds, each listed once the round before it is written: first the stale items of ``order``
    in that order, then sweeps through the gallery by id, each round's rows sorted by id. A sweep is repeated
    until one finds nothing stale (less the items skipped as undecodable), so an item that a listing passed over
    is caught by the next sweep instead of being left behind."""
    if order is not None:
        wanted = [int(i) for i in order]
        for start in range(0, len(wanted), plan.round_size):
            ids = wanted[start : start + plan.round_size]
            by_id = {int(row["id"]): row for row in store.get(ids) if int(row["generation"]) != target}
            skipped = progress.skipped_ids
            rows = [by_id.pop(i) for i in ids if i in by_id and i not in skipped]
            if rows:
                yield rows, True
    found = True
    while found:
        found, after = False, None
        while rows := _list_round(store, target, plan.round_size, after, progress.skipped_ids):
            found, after = True, int(rows[-1]["id"])
            yield rows, False


def _list_round(store: GalleryStore, target: int, size: int, after: int | None, skipped: set[int]) -> list[dict]:
    """Up to ``size`` stale items with ids above ``after``, sorted by id, in pages the store can return."""
    rows: list[dict] = []
    while len(rows) < size:
        page = store.stale(target, min(store.page_limit, size - len(rows)), exclude=skipped, after=after)
        if not page:
            break
        page.sort(key=lambda row: int(row["id"]))
        rows += page
        after = int(page[-1]["id"])
    return [{"id": int(row["id"]), "ref": str(row["ref"]), "previous_generation": int(row["previous_generation"])}
            for row in rows]  # fmt: skip


def run_ray_backfill(
    store: GalleryStore,
    generation: Generation,
    image_root: Path,
    plan: RayPlan | None = None,
    progress: BackfillProgress | None = None,
    on_batch: Callable[[BackfillProgress], None] | None = None,
    order: Sequence[int] | None = None,
) -> BackfillProgress:
    """Re-embed every stale item with ``generation``'s model on Ray until none is left; ``order``: item ids to
    re-embed first, in that order (written in that order too), the rest following by id."""
    plan = plan or RayPlan()
    if generation.dim != store.dim:
        raise DataError(f"the model embeds to {generation.dim} dimensions, the gallery holds {store.dim}")
    if plan.batch_size < 1 or plan.shard_size < 1 or plan.round_size < 1:
        raise DataError("batch, shard and round sizes must be at least 1")
    ray = import_ray()
    target = generation.number
    progress = progress or BackfillProgress(target)
    progress.state = "running"
    initial = store.count(f"generation != {target}")
    progress.remaining = initial
    started = connect(ray, plan.address)
    writer = DriverWriter(store, target, progress, initial, on_batch)
    try:
        model = ray.put(Path(generation.path).read_bytes())
        prep = read_meta(read_checkpoint(generation.path), generation.path).prep
        for rows, ordered in stale_rounds(store, target, plan, order, progress):
            restorable, rest = split_restorable(rows, target)
            writer.restore(restorable)
            if rest:
                _run_round(ray, rest, ordered, prep, image_root, plan, model, writer)
            writer.drain()
    except ray.exceptions.RayError as exc:
        raise DataError(f"the Ray backfill failed (run it again to resume): {_reason(exc)}") from None
    finally:
        writer.close()
        store.flush()
        if started:
            ray.shutdown()
    progress.remaining, progress.state = 0, "finished"
    return progress


def _run_round(ray: Any, rows: list[dict], ordered: bool, prep: Preprocessing, root: Path, plan: RayPlan,
               model: Any, writer: DriverWriter) -> None:  # fmt: skip
    """Stream one round through the pipeline into the writer (the caller drains it); an ordered round keeps its
    blocks in order."""
    context = ray.data.DataContext.get_current()
    keep = context.execution_options.preserve_order
    context.execution_options.preserve_order = ordered
    try:
        dataset = round_dataset(ray, rows, prep, root, plan, model)
        for batch in dataset.iter_batches(batch_size=plan.batch_size, batch_format="numpy"):
            writer.write(batch)
    finally:
        context.execution_options.preserve_order = keep


def _reason(exc: BaseException) -> str:
    """The first line of what went wrong in a Ray task, rather than Ray's wrapping of it."""
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

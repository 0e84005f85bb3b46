"""Ray backfill benchmark: items/s of ``--engine ray`` against the single-process backfill on the same gallery in the
same run (their ratio), with the raw embedding throughput (decode + forward of the same images, no store) as the
ceiling both are measured against.

The gallery holds ``--items`` items at generation 1 (random unit vectors) that reference ``--images`` distinct PNG
files; each run re-embeds every item towards a generation of its own (2, 3, ...), so every run does the whole job
and the engines alternate over the same span of time. The local Ray is started once, before the timed runs: a
cluster exists before a backfill is submitted to it, and its start is printed apart. A Ray run's time includes its
actors loading the model. Figures are medians over ``--repeats`` runs of each.

    python bench/bench_ray_backfill.py [--items 2000 --images 400 --batch 64 --repeats 3]
    python bench/bench_ray_backfill.py --db http://host:19530 --address auto   # a Milvus server and a Ray cluster
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from advbct.serving.backfill import run_backfill  # noqa: E402
from advbct.serving.models import Embedder  # noqa: E402
from advbct.serving.ray_backfill import RayPlan, connect, import_ray, run_ray_backfill  # noqa: E402
from advbct.serving.registry import Generation  # noqa: E402
from advbct.serving.store import GalleryStore  # noqa: E402
from bench_serving import briefly_trained_model  # noqa: E402
from conftest import write_image_folder  # noqa: E402


def gallery(uri: str, dim: int, items: int, files: list[Path], root: Path) -> GalleryStore:
    """``items`` items at generation 1 with random vectors, item i referencing file i mod len(files)."""
    store = GalleryStore(uri, dim, collection=f"bench_ray_{uuid.uuid4().hex}")
    rng = np.random.default_rng(0)
    for offset in range(0, items, 10_000):
        ids = list(range(offset, min(items, offset + 10_000)))
        refs = [str(files[i % len(files)].relative_to(root)) for i in ids]
        store.add(ids, refs, rng.standard_normal((len(ids), dim)).astype(np.float32), 1)
    return store


def raw_rate(embedder: Embedder, paths: list[Path], batch: int) -> float:
    """Images per second of decode + forward alone, in batches of ``batch``."""
    started = time.perf_counter()
    for offset in range(0, len(paths), batch):
        embedder.embed_files(paths[offset : offset + batch])
    return len(paths) / (time.perf_counter() - started)


def timed(job) -> float:
    """Items per second of a backfill ``job``, which must finish with nothing skipped (else its rate means little)."""
    started = time.perf_counter()
    progress = job()
    seconds = time.perf_counter() - started
    assert progress.state == "finished" and progress.skipped == [], progress
    return progress.done / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--images", type=int, default=400, help="distinct image files the items reference")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--db", help="a Milvus server URI (default: a Milvus Lite file in the work folder)")
    parser.add_argument("--address", help="a Ray cluster (default: a local Ray for this machine's cores)")
    parser.add_argument("--actors", type=int, help="embedding actors (default: as the Ray engine chooses)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="advbct-bench-ray-"))
    os.environ["ADVBCT_CACHE"] = str(work / "cache")
    try:
        run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    root = write_image_folder(work / "images", classes=4, train_per_class=max(1, args.images // 4), test_per_class=2)
    files = sorted((root / "train").rglob("*.png"))
    checkpoint = briefly_trained_model(root, work / "model", 1, args.dim)
    embedder = Embedder(checkpoint)
    store = gallery(args.db or str(work / "gallery.db"), args.dim, args.items, files, root)
    paths = [files[i % len(files)] for i in range(args.items)]
    ray = import_ray()
    started = time.perf_counter()
    connect(ray, args.address)
    print(f"Ray started or joined in {time.perf_counter() - started:.1f} s: {ray.cluster_resources()}")
    plan = RayPlan(args.address, args.actors, None, args.batch)
    raw_rate(embedder, paths[: args.batch], args.batch)  # warm-up
    rates: dict[str, list[float]] = {"raw": [], "process": [], "ray": []}
    target = 1
    for _ in range(args.repeats):
        rates["raw"].append(raw_rate(embedder, paths, args.batch))
        target += 1
        rates["process"].append(timed(lambda t=target: run_backfill(store, embedder, t, root, args.batch)))
        target += 1
        generation = Generation(target, str(checkpoint), embedder.meta.model_id, args.dim, embedder.prep.image_size,
                                time.time(), None)  # fmt: skip
        rates["ray"].append(timed(lambda g=generation: run_ray_backfill(store, g, root, plan)))
    assert store.generations() == {target: args.items}
    store.client.drop_collection(store.collection)
    ray.shutdown()
    report(args, rates)


def report(args: argparse.Namespace, rates: dict[str, list[float]]) -> None:
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"gallery: {args.items} items over {args.images} PNG files, batch {args.batch}, {args.repeats} runs each")
    for name, label in (("raw", "raw embedding (decode + forward, no store)"),
                        ("process", "single-process backfill"), ("ray", "Ray backfill")):  # fmt: skip
        values = ", ".join(f"{v:.0f}" for v in rates[name])
        print(f"{label}: median {median[name]:.0f} items/s ({values}); {median[name] / median['raw']:.2f} of raw")
    print(f"Ray / single-process: {median['ray'] / median['process']:.2f}")
    print(f"torch threads in this process: {torch.get_num_threads()}; CPUs: {len(os.sched_getaffinity(0))}")


if __name__ == "__main__":
    main()

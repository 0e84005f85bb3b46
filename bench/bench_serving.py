"""Serving benchmark: a 100,000-item gallery of 256-d vectors in Milvus Lite, or on a Milvus server.

Prints (median / percentiles over many calls, measured in one run):
- search latency p50 / p99 for one query image's vector, top-10;
- backfill throughput (decode image files, embed, check, upsert) in items/s over the whole gallery, as a ratio
  to the raw embedding throughput of the same model on the same files and batch size (decode + forward only).
  Target: >= 0.8;
- the time from registering a compatible model (the gate included) to the first query it answers.

The gallery starts as random unit vectors at generation 1 (search cost does not depend on the values); the
backfill re-embeds all of them from real PNG files (4,000 distinct images, each referenced by 25 items) with a
generation-2 model.

    python bench/bench_serving.py [--items 100000 --dim 256]
    python bench/bench_serving.py --db http://host:19530       # a running Milvus server
    python bench/bench_serving.py --start-server                # the `milvus` package's standalone server, here
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from advbct.cli import train_config  # noqa: E402
from advbct.pipeline import train_old  # noqa: E402
from advbct.serving.backfill import run_backfill  # noqa: E402
from advbct.serving.models import Embedder, ModelRegistry  # noqa: E402
from advbct.serving.store import GalleryStore  # noqa: E402
from conftest import start_milvus_server, write_image_folder  # noqa: E402


def tiny_model(folder: Path, out: Path, seed: int, dim: int) -> Path:
    overrides = ["data.dataset=image-folder", "device=cpu", f"seed={seed}", "optim.epochs=1",
                 f"model.embedding_dim={dim}"]  # fmt: skip
    return train_old(train_config("old", "smoke", None, overrides, str(folder), None), out, show_progress=False)


@contextmanager
def gallery_uri(args: argparse.Namespace, work: Path):
    """The database the benchmark runs on: the given URI, a standalone server started here, or a Lite file."""
    if not args.start_server:
        yield args.db or str(work / "gallery.db")
        return
    server = start_milvus_server(work / "milvus-server")
    try:
        yield f"http://127.0.0.1:{server.listen_port}"
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--searches", type=int, default=300)
    parser.add_argument("--db", help="a Milvus server URI (default: a Milvus Lite file in the work folder)")
    parser.add_argument("--start-server", action="store_true", help="start the `milvus` package's server and use it")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="advbct-bench-serving-"))
    with gallery_uri(args, work) as uri:
        run(args, work, uri)


def run(args: argparse.Namespace, work: Path, uri: str) -> None:
    root = write_image_folder(work / "images", classes=10, train_per_class=400, test_per_class=20)
    files = sorted((root / "train").rglob("*.png"))
    old_path = tiny_model(root, work / "old", 0, args.dim)
    new_path = tiny_model(root, work / "new", 1, args.dim)

    registry = ModelRegistry(work / "models.json")
    registry.register_first(old_path)
    # A collection of its own, so a benchmark on a shared server never touches another gallery.
    store = GalleryStore(uri, args.dim, collection=f"bench_{uuid.uuid4().hex}")
    print(f"database: {uri}")
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for offset in range(0, args.items, 10_000):
        count = min(10_000, args.items - offset)
        ids = list(range(offset, offset + count))
        refs = [str(files[i % len(files)].relative_to(root)) for i in ids]
        store.add(ids, refs, rng.standard_normal((count, args.dim)).astype(np.float32), 1)
    print(f"gallery: {args.items} items x {args.dim} dims inserted in {time.perf_counter() - start:.1f} s")

    old = Embedder(old_path)
    query = old.embed_files(files[:1])
    store.search(query, 10)
    latencies = []
    for _ in range(args.searches):
        t = time.perf_counter()
        store.search(query, 10)
        latencies.append(time.perf_counter() - t)
    latencies_ms = sorted(1e3 * x for x in latencies)
    p99 = latencies_ms[min(len(latencies_ms) - 1, int(0.99 * len(latencies_ms)))]
    print(f"search top-10, {args.searches} queries: p50 {statistics.median(latencies_ms):.2f} ms, p99 {p99:.2f} ms")

    started = time.perf_counter()
    registry.upgrade(new_path, root / "test", force=True)
    new = Embedder(registry.active.path)
    first = store.search(new.embed_files(files[:1]), 10)
    to_first_query = time.perf_counter() - started
    print(
        f"register generation 2 (gate on {len(list((root / 'test').rglob('*.png')))} validation images) "
        f"-> first query answered: {to_first_query:.2f} s ({len(first[0])} hits)"
    )

    sample = files[: args.batch * 8]
    new.embed_files(sample[: args.batch])

    def raw_rates(repeats: int = 3) -> list[float]:
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            for i in range(0, len(sample), args.batch):
                new.embed_files(sample[i : i + args.batch])
            rates.append(len(sample) / (time.perf_counter() - t))
        return rates

    # The raw rate is measured before and after the backfill: the database's background work (compaction after
    # bulk writes) takes CPU from the embedder for a while, and one side alone moved the ratio by 0.2 between runs.
    before = raw_rates()
    t = time.perf_counter()
    progress = run_backfill(store, new, 2, root, args.batch)
    backfill_rate = progress.done / (time.perf_counter() - t)
    assert progress.state == "finished" and store.count("generation == 2") == args.items
    after = raw_rates()
    raw_rate = statistics.median(before + after)
    print(
        f"raw embedding (decode + forward, batch {args.batch}): median of 6 {raw_rate:.0f} images/s "
        f"(before the backfill {statistics.median(before):.0f}, after {statistics.median(after):.0f})"
    )
    print(f"backfill ({progress.done} items: decode, embed, check, upsert): {backfill_rate:.0f} items/s")
    print(f"backfill / raw embedding throughput: {backfill_rate / raw_rate:.2f} (target >= 0.8)")
    print(f"threads: {torch.get_num_threads()}; work folder {work}")
    store.client.drop_collection(store.collection)


if __name__ == "__main__":
    main()

"""Serving benchmark: a 100,000-item gallery of 256-d vectors in Milvus Lite, or on a Milvus server.

Prints (median / percentiles over many calls, measured in one run):
- search latency p50 / p99 for one query image's vector, top-10;
- the active generation's merged search (what the service runs) p50 / p99, each part of the gallery searched (a
  store without the item ledger, which knows no counts) against the parts the ledger's counts leave (the same
  collection, the same queries, calls alternated): on the one-generation gallery, a third of the way through the
  backfill, and after it;
- backfill throughput (decode image files, embed, check, upsert) in items/s over the whole gallery, as a ratio
  to the raw embedding throughput of the same model on the same files and batch size (decode + forward only).
  Target: >= 0.8. The backfill runs in segments with the raw rate measured before, between and after them: a
  shared machine's speed drifts within a minute, so both sides must be sampled across the same span. Each extra
  segment re-lists the stale items once, a cost a single backfill would not pay;
- the time from registering a compatible model (the gate included) to the first query it answers.

The gallery starts as random unit vectors at generation 1 (search cost does not depend on the values); the
backfill re-embeds all of them from real PNG files (4,000 distinct images, each referenced by 25 items) with a
generation-2 model: ``--model smoke`` (default) is a tiny network, the case where the database's share of the work
is largest; ``--model paper`` is the paper's resnet18 (small-input stem, 256-d), the model this project trains for
256-d embeddings.

Where the database runs matters as much as what it is. Milvus Lite runs inside this process and shares its cores
with the embedder. A server normally has cores of its own: ``--start-server --server-cpus 1`` starts the
standalone server on CPU 1 and runs everything else (the raw measurement included) on the other CPUs.

    python bench/bench_serving.py [--items 100000 --dim 256 --model smoke|paper]
    python bench/bench_serving.py --db http://host:19530       # a running Milvus server
    python bench/bench_serving.py --start-server [--server-cpus 1]   # the `milvus` package's standalone server
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from advbct.pipeline import train_old  # noqa: E402
from advbct.presets import train_config  # noqa: E402
from advbct.serving.backfill import BackfillProgress, run_backfill  # noqa: E402
from advbct.serving.ledger import ItemLedger  # noqa: E402
from advbct.serving.models import Embedder  # noqa: E402
from advbct.serving.registry import ModelRegistry  # noqa: E402
from advbct.serving.store import GalleryStore, MixedMerge  # noqa: E402
from conftest import start_milvus_server, write_image_folder  # noqa: E402

MODEL_PRESETS = {"smoke": "smoke", "paper": "paper-cifar100"}


def briefly_trained_model(folder: Path, out: Path, seed: int, dim: int, model: str = "smoke") -> Path:
    """A checkpoint of the chosen architecture after one short epoch (throughput does not depend on accuracy)."""
    overrides = ["data.dataset=image-folder", "device=cpu", f"seed={seed}", "optim.epochs=1", "optim.milestones=[]",
                 "data.max_train_per_class=40", f"model.embedding_dim={dim}"]  # fmt: skip
    config = train_config("old", MODEL_PRESETS[model], None, overrides, str(folder), None)
    return train_old(config, out, show_progress=False)


def cpu_split(server_cpus: str | None) -> tuple[set[int] | None, set[int]]:
    """(the server's CPUs or None, this process's CPUs) from a list like ``1`` or ``2,3``."""
    mine = os.sched_getaffinity(0)
    if not server_cpus:
        return None, mine
    server = {int(c) for c in server_cpus.split(",")}
    if not server < mine:
        raise SystemExit(f"--server-cpus {server_cpus}: must be a proper subset of this process's CPUs {sorted(mine)}")
    return server, mine - server


@contextmanager
def gallery_uri(args: argparse.Namespace, work: Path):
    """The database the benchmark runs on: the given URI, a standalone server started here, or a Lite file."""
    if not args.start_server:
        yield args.db or str(work / "gallery.db")
        return
    server_cpus, own_cpus = cpu_split(args.server_cpus)
    if server_cpus is None:
        server = start_milvus_server(work / "milvus-server")
    else:
        # The server inherits the CPUs of the thread that starts it; everything this process starts afterwards (the
        # embedder's threads included) inherits the rest.
        os.sched_setaffinity(0, server_cpus)
        server = start_milvus_server(work / "milvus-server")
        os.sched_setaffinity(0, own_cpus)
        torch.set_num_threads(len(own_cpus))
    try:
        yield f"http://127.0.0.1:{server.listen_port}"
    finally:
        server.stop()


def percentiles_ms(seconds: list[float]) -> str:
    ms = sorted(1e3 * x for x in seconds)
    return f"p50 {statistics.median(ms):.2f} ms, p99 {ms[min(len(ms) - 1, int(0.99 * len(ms)))]:.2f} ms"


def compare_merged_search(
    every_part: GalleryStore, counted: GalleryStore, merge: MixedMerge, query: np.ndarray, searches: int, when: str
) -> None:
    """Merged-search latency through ``every_part`` (no ledger) and ``counted`` (its ledger rebuilt from Milvus
    now, so its counts are this moment's), alternating calls so both see the same drift of a shared machine."""
    counted.ledger.rebuild(counted, f"benchmark: counts taken {when}")
    parts: list[str] = []
    counted.on_search = parts.append
    stores = {"every part": every_part, "parts skipped by counts": counted}
    answers = [[(h.id, h.matched_generation) for h in s.search(query, 10, merge)[0]] for s in stores.values()]
    assert answers[0] == answers[1], f"the same answer {when}"
    parts.clear()
    timings: dict[str, list[float]] = {name: [] for name in stores}
    for _ in range(searches):
        for name, store in stores.items():
            t = time.perf_counter()
            store.search(query, 10, merge)
            timings[name].append(time.perf_counter() - t)
    measured = "; ".join(f"{name} {percentiles_ms(times)}" for name, times in timings.items())
    print(f"merged search top-10 {when} (active generation {merge.active}), {searches} queries: {measured} "
          f"(counted: {len(parts) / searches:.0f} searches a query, {', '.join(sorted(set(parts)))})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--searches", type=int, default=300)
    parser.add_argument("--db", help="a Milvus server URI (default: a Milvus Lite file in the work folder)")
    parser.add_argument("--start-server", action="store_true", help="start the `milvus` package's server and use it")
    parser.add_argument("--server-cpus", help="with --start-server: the CPUs the server runs on (e.g. 1); the rest run "
                        "the embedder")  # fmt: skip
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="smoke", help="the embedding model")
    parser.add_argument("--segments", type=int, default=3, help="backfill segments, the raw rate measured around each")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (gallery, models, images)")
    args = parser.parse_args()
    if args.server_cpus and not args.start_server:
        parser.error("--server-cpus needs --start-server")
    work = Path(tempfile.mkdtemp(prefix="advbct-bench-serving-"))
    os.environ["ADVBCT_CACHE"] = str(work / "cache")  # decoded copies of throw-away images stay with them
    try:
        with gallery_uri(args, work) as uri:
            run(args, work, uri)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, uri: str) -> None:
    root = write_image_folder(work / "images", classes=10, train_per_class=400, test_per_class=20)
    files = sorted((root / "train").rglob("*.png"))
    old_path = briefly_trained_model(root, work / "old", 0, args.dim, args.model)
    new_path = briefly_trained_model(root, work / "new", 1, args.dim, args.model)

    registry = ModelRegistry(work / "registry.sqlite")
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
    print(f"search top-10, {args.searches} queries: {percentiles_ms(latencies)}")
    counted = GalleryStore(uri, args.dim, store.collection, ledger=ItemLedger(registry, store.collection))
    compare_merged_search(store, counted, registry.active.mixed_merge(), query, args.searches, "on one generation")

    started = time.perf_counter()
    registry.upgrade(new_path, root / "test", force=True, reason="benchmark: speed, not quality")
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

    raw = raw_rates()
    done, backfill_seconds = 0, 0.0
    for segment in range(args.segments):
        quota = args.items * (segment + 1) // args.segments - done
        stop = threading.Event()

        def stop_at_quota(progress: BackfillProgress, quota: int = quota, stop: threading.Event = stop) -> None:
            if progress.done >= quota:
                stop.set()

        last = segment == args.segments - 1  # runs to the end, so it finishes without a closing count
        t = time.perf_counter()
        progress = run_backfill(store, new, 2, root, args.batch, stop=stop, on_batch=None if last else stop_at_quota)
        backfill_seconds += time.perf_counter() - t
        done += progress.done
        raw += raw_rates()
        if segment == 0 and not last:
            mixed = registry.active.mixed_merge()
            compare_merged_search(store, counted, mixed, new.embed_files(files[:1]), args.searches, "mid-backfill")
    assert progress.state == "finished"
    compare_merged_search(
        store, counted, registry.active.mixed_merge(), new.embed_files(files[:1]), args.searches, "after the backfill"
    )
    assert done == args.items == store.count("generation == 2"), (done, store.count("generation == 2"))
    backfill_rate = done / backfill_seconds
    raw_rate = statistics.median(raw)
    print(
        f"raw embedding (decode + forward, batch {args.batch}): median of {len(raw)} {raw_rate:.0f} images/s "
        f"(min {min(raw):.0f}, max {max(raw):.0f}; measured around {args.segments} backfill segments)"
    )
    print(f"backfill ({done} items, {args.segments} segments; decode, embed, check, upsert): {backfill_rate:.0f}/s")
    print(f"backfill / raw embedding throughput: {backfill_rate / raw_rate:.2f} (target >= 0.8)")
    cpus = sorted(os.sched_getaffinity(0))
    print(f"model: {args.model}; threads: {torch.get_num_threads()} on CPUs {cpus}")
    counted.close()
    store.client.drop_collection(store.collection)


if __name__ == "__main__":
    main()

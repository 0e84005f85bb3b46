"""What progress polling costs: the backfill status read and search latency while pages poll it, on a gallery of
``--items`` random vectors in Milvus Lite, half of them re-embedded (a backfill half way).

GET /backfill needs the gallery's items per generation. Two ways of getting them are timed in the same run, on the
same gallery: the scan (``GalleryStore.generations``: one filtered count per generation, each a pass over the
collection) and the registry's item ledger (``ItemLedger.counts``: one SQLite read). Each phase runs for
``--seconds``: ``--pages`` threads, each a page open on the status, call the function every ``--interval`` seconds
(staggered), while one thread searches without pause (top-10 of a random vector); a first phase without pages gives
search latency alone. The functions are called directly, as the route calls them: the HTTP layer costs both ways
the same, and serving it would need a trained model.

Items are inserted directly through the store (random unit vectors, no image decoding), journalled in the ledger as
every write is.

    python bench/bench_backfill_status.py [--items 60000 --dim 256 --pages 3 --interval 2 --seconds 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from advbct.serving.ledger import open_counted_store
from advbct.serving.registry import ModelRegistry
from advbct.serving.store import GalleryStore

BATCH = 4096


def build(store: GalleryStore, items: int, dim: int, seed: int = 0) -> None:
    """``items`` random vectors at generation 1, then every second one re-embedded at generation 2."""
    rng = np.random.default_rng(seed)
    for start in range(0, items, BATCH):
        ids = list(range(start, min(start + BATCH, items)))
        store.add(ids, [f"item/{i}.png" for i in ids], rng.standard_normal((len(ids), dim)), generation=1)
    half = list(range(0, items, 2))
    for start in range(0, len(half), BATCH):
        ids = half[start : start + BATCH]
        store.replace(ids, [f"item/{i}.png" for i in ids], rng.standard_normal((len(ids), dim)), generation=2)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def phase(
    store: GalleryStore, status: Callable[[], dict[int, int]] | None, pages: int, interval: float, seconds: float
) -> dict:
    """Latencies (ms) of the status calls and of back-to-back searches over ``seconds``."""
    stop = threading.Event()
    status_ms: list[float] = []
    search_ms: list[float] = []
    sums: set[int] = set()

    def page(offset: float) -> None:
        if stop.wait(offset):
            return
        while not stop.is_set():
            started = time.perf_counter()
            counts = status()
            status_ms.append((time.perf_counter() - started) * 1e3)
            sums.add(sum(counts.values()))
            stop.wait(max(0.0, interval - (time.perf_counter() - started)))

    def search() -> None:
        rng = np.random.default_rng(1)
        while not stop.is_set():
            query = rng.standard_normal((1, store.dim))
            started = time.perf_counter()
            store.search(query, 10)
            search_ms.append((time.perf_counter() - started) * 1e3)

    threads = [threading.Thread(target=search)]
    if status is not None:
        threads += [threading.Thread(target=page, args=(interval * i / pages,)) for i in range(pages)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return {"status_ms": status_ms, "search_ms": search_ms, "sums": sums}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--pages", type=int, default=3, help="threads polling the status, as open pages do")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between one page's polls")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        registry = ModelRegistry(Path(work) / "gallery.db.registry.sqlite")
        store = open_counted_store(registry, str(Path(work) / "gallery.db"), args.dim)
        started = time.perf_counter()
        build(store, args.items, args.dim)
        print(f"gallery: {store.count()} items, {store.ledger.counts()} by generation "
              f"(built in {time.perf_counter() - started:.1f} s)")  # fmt: skip
        assert store.generations() == store.ledger.counts(), "the ledger agrees with the scan"
        phases = [("no polling", None), ("scan (before)", store.generations), ("ledger (after)", store.ledger.counts)]
        print(f"{args.pages} pages polling every {args.interval:g} s, {args.seconds:g} s per phase; latencies in ms")
        print(f"{'status from':<16} {'polls':>6} {'status p50':>11} {'p99':>8} {'searches':>9} {'search p50':>11} "
              f"{'p99':>8}  sums seen")  # fmt: skip
        for name, status in phases:
            result = phase(store, status, args.pages, args.interval, args.seconds)
            polls, searches = result["status_ms"], result["search_ms"]
            print(f"{name:<16} {len(polls):>6} {percentile(polls, 50):>11.2f} {percentile(polls, 99):>8.2f} "
                  f"{len(searches):>9} {statistics.median(searches):>11.2f} {percentile(searches, 99):>8.2f}  "
                  f"{sorted(result['sums'])}")  # fmt: skip
        store.close()


if __name__ == "__main__":
    main()

"""GLDv2-size exact search and mAP@100: 1,129 queries x 761,757 index vectors x 256 dims, on this machine.

Random unit vectors stand in for embeddings (the search cost does not depend on their values) and a random
solution (1 to 50 relevant index rows per query) for the ground truth. Prints the search time and the mAP@100
time (median of ``--runs``), the throughput, and the process's peak resident memory next to the size of the
vectors themselves, to show the score matrix (3.4 GB in float32) is never held. Target: under 60 s on 2 cores.

    python bench/bench_gldv2_search.py [--gallery 761757 --queries 1129 --dim 256 --runs 3]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from advbct.evaluation import exact_search, gldv2_map


def random_unit_vectors(n: int, dim: int, generator: torch.Generator, chunk: int = 131072) -> torch.Tensor:
    out = torch.empty(n, dim)
    for start in range(0, n, chunk):
        block = out[start : start + chunk]
        block.copy_(F.normalize(torch.randn(block.shape, generator=generator), dim=1))
    return out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=761_757)
    parser.add_argument("--queries", type=int, default=1_129)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gallery-chunk", type=int, default=65536)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    gallery = random_unit_vectors(args.gallery, args.dim, gen)
    queries = random_unit_vectors(args.queries, args.dim, gen)
    sizes = torch.randint(1, 51, (args.queries,), generator=gen).tolist()
    solution = {q: torch.randint(0, args.gallery, (n,), generator=gen).tolist() for q, n in enumerate(sizes)}
    inputs_gib = (gallery.numel() + queries.numel()) * 4 / 2**30
    print(f"{args.queries} queries x {args.gallery} index vectors x {args.dim} dims, {torch.get_num_threads()} threads")
    full_gib = args.queries * args.gallery * 4 / 2**30
    print(f"vectors: {inputs_gib:.2f} GiB; a full float32 score matrix would be {full_gib:.2f} GiB")
    search_times, map_times = [], []
    for _ in range(args.runs):
        start = time.perf_counter()
        _, ranks = exact_search(queries, gallery, args.k, gallery_chunk=args.gallery_chunk, normalise=False)
        search_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        score = gldv2_map(ranks, solution, args.k)
        map_times.append(time.perf_counter() - start)
    search, scoring = statistics.median(search_times), statistics.median(map_times)
    flops = 2 * args.queries * args.gallery * args.dim
    print(f"exact search top-{args.k}, median of {args.runs}: {search:7.2f} s  ({flops / search / 1e9:.1f} GFLOP/s)")
    print(f"mAP@{args.k}, median of {args.runs}:            {scoring * 1e3:7.2f} ms  (random data: {score:.4f}%)")
    print(f"total {search + scoring:.2f} s (target < 60 s); peak resident memory {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()

"""Ranking cost of the label-retrieval metrics: counting against a full stable argsort, in the same run.

``relevant_positions`` (sort the irrelevant scores as plain values, binary-search each relevant score among them)
and ``relevant_positions_by_sort`` (the straightforward stable argsort of every row) are timed on the same
(chunk x gallery) similarity blocks; the whole ``label_retrieval_metrics`` call is timed as well. The data is a
CIFAR-100-sized test set (100 classes x 100 images, 128-d embeddings clustered by class), and both paths are
checked to give the same positions before anything is timed.

    python bench/bench_metrics.py [--queries 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from advbct.evaluation import label_retrieval_metrics
from advbct.evaluation.metrics import relevant_positions, relevant_positions_by_sort
from bench_step import interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    labels = torch.arange(args.queries) % args.classes
    centres = torch.randn(args.classes, args.dim)
    gallery = F.normalize(centres[labels] * 0.3 + torch.randn(args.queries, args.dim), dim=1)
    queries = F.normalize(centres[labels] * 0.3 + torch.randn(args.queries, args.dim), dim=1)
    blocks = []
    for start in range(0, args.queries, args.chunk):
        sims = queries[start : start + args.chunk] @ gallery.T
        relevant = labels.unsqueeze(0) == labels[start : start + args.chunk].unsqueeze(1)
        blocks.append((sims, relevant, torch.ones_like(relevant)))
    for block in blocks:
        if not torch.equal(relevant_positions(*block), relevant_positions_by_sort(*block)):
            raise SystemExit("counting and sorting disagree")

    def rank_all(rank) -> None:
        for block in blocks:
            rank(*block)

    def whole_metrics() -> None:
        label_retrieval_metrics(queries, labels, gallery, labels, exclude_same_index=True, chunk_size=args.chunk)

    steps = {
        "argsort (stable)": lambda: rank_all(relevant_positions_by_sort),
        "counting": lambda: rank_all(relevant_positions),
        "label_retrieval_metrics": whole_metrics,
    }
    # Interleaved rounds, so drift in the machine's speed falls on every row alike.
    medians = interleaved_medians(steps, args.repeats, 0, 1, torch.device("cpu"))
    baseline = medians["argsort (stable)"]
    print(
        f"{args.queries} queries x {args.queries} gallery, {args.classes} classes, dim {args.dim}, "
        f"chunks of {args.chunk}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'ranking':28s} {'seconds':>8s} {'vs argsort':>11s}")
    for name, median in medians.items():
        print(f"{name:28s} {median:8.2f} {baseline / median:10.2f}x")


if __name__ == "__main__":
    main()

"""Revisited mAP speed: the vectorised ``revisited_map`` against a per-query Python loop, in the same run.

Uses the official ROxford5k ground truth (70 queries x 4,993 database images) when it is found (``--gnd`` or
``$ADVBCT_DATA/revisitop`` or ``../shared/data/revisitop``), else a synthetic ground truth of the same shape, and
random full rankings. Prints the median time of each over several runs and the speed-up. Target: under 20 ms on
2 cores and at least 20x faster than the loop.

    python bench/bench_revisited_map.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from advbct.data.revisited import load_revisited  # noqa: E402
from advbct.evaluation import revisited_map  # noqa: E402
from reference_landmarks import reference_revisited  # noqa: E402


def ground_truth(explicit: Path | None) -> tuple[list[dict], int, str]:
    env = os.environ.get("ADVBCT_DATA")
    candidates = [explicit] if explicit else [Path(env) / "revisitop"] if env else []
    candidates.append(REPO.parent / "shared" / "data" / "revisitop")
    for root in candidates:
        if root is not None and (root / "gnd_roxford5k.pkl").is_file():
            data = load_revisited(root, "roxford5k")
            return list(data.gnd), len(data.imlist), f"official ROxford5k ground truth ({root})"
    gen = torch.Generator().manual_seed(0)
    gnd = []
    for _ in range(70):
        picks = torch.randperm(4993, generator=gen)[:150].tolist()
        gnd.append({"easy": picks[:50], "hard": picks[50:100], "junk": picks[100:]})
    return gnd, 4993, "synthetic ground truth (official file not found)"


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gnd", type=Path, default=None, help="folder holding gnd_roxford5k.pkl")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--loop-runs", type=int, default=3)
    args = parser.parse_args()
    gnd, db_size, source = ground_truth(args.gnd)
    gen = torch.Generator().manual_seed(1)
    ranks = torch.stack([torch.randperm(db_size, generator=gen) for _ in gnd])
    fast, slow = revisited_map(ranks, gnd), reference_revisited(ranks, gnd)
    for protocol in fast:
        for key, value in fast[protocol].items():
            assert abs(value - slow[protocol][key]) < 1e-6, (protocol, key, value, slow[protocol][key])
    revisited_map(ranks, gnd)
    vectorised = median_time(lambda: revisited_map(ranks, gnd), args.runs)
    loop = median_time(lambda: reference_revisited(ranks, gnd), args.loop_runs)
    print(f"{source}: {len(gnd)} queries x {db_size} database images, {torch.get_num_threads()} threads")
    print(f"revisited_map (vectorised)  median of {args.runs}: {vectorised * 1e3:8.2f} ms   (target < 20 ms)")
    print(f"per-query Python loop       median of {args.loop_runs}: {loop * 1e3:8.2f} ms")
    print(f"speed-up: {loop / vectorised:.1f}x   (target >= 20x); both agree to 1e-6 on every number")


if __name__ == "__main__":
    main()

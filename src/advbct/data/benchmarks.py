"""Where the landmark retrieval benchmarks live on disk.

Search order, as for CIFAR-100: an explicit ``--data`` path, then ``$ADVBCT_DATA``, then ``../shared/data``.
Inside a base folder a benchmark may sit at the base itself, at ``<base>/<name>``, or (for the revisited sets,
as the revisitop ground truth is often kept together) at ``<base>/revisitop``.
"""

from __future__ import annotations

import os
from pathlib import Path

from advbct.data.images import DataError
from advbct.data.revisited import REVISITED_NAMES

BENCHMARK_NAMES = (*REVISITED_NAMES, "gldv2")


def _ground_truth_file(name: str) -> str:
    return "retrieval_solution_v2.1.csv" if name == "gldv2" else f"gnd_{name}.pkl"


def find_benchmark_root(name: str, explicit: str | Path | None = None) -> Path:
    """The folder holding benchmark ``name``'s ground truth."""
    if name not in BENCHMARK_NAMES:
        raise DataError(f"unknown benchmark {name!r}; use one of {', '.join(BENCHMARK_NAMES)}")
    if explicit is not None:
        bases = [Path(explicit)]
    else:
        env = os.environ.get("ADVBCT_DATA")
        bases = [Path(env)] if env else [Path.cwd().parent / "shared" / "data"]
    for base in bases:
        for candidate in (base, base / name, base / "revisitop"):
            if (candidate / _ground_truth_file(name)).is_file():
                return candidate
    raise DataError(
        f"{_ground_truth_file(name)} not found under {bases[0]} (looked in it, {name}/ and revisitop/); "
        f"get the benchmark with `advbct download {name} --root DIR` and pass --data DIR"
    )

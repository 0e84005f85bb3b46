"""Summed training throughput of several new models trained at once: processes against threads, as the table does.

``advbct bench --jobs N`` trains a setting's new models N at a time. In separate processes their kernels take turns
on the GPU; in threads of one process (``--job-mode threads``) each run has its own CUDA stream and their kernels
can overlap, which pays off where one small model's kernels leave most of the chip idle and ``cuda_graph`` keeps
Python out of the way. This trains the same new models (independent and every method, from one old model) once per
mode, the modes alternating over ``--rounds``, and prints each pass's wall time and summed images/s: every image
of every run over the pass's wall time, model set-up, capture and checkpoints included, as the table pays them.

    python bench/bench_concurrency.py --data /tmp/cifar100 --device cuda --jobs 7 -o common.cuda_graph=true
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console

from advbct import pipeline
from advbct.compat import compared_methods
from advbct.table_bench import setting_config


def images_trained(run_dir: Path) -> float:
    history = json.loads((run_dir / "history.json").read_text())
    return sum(epoch["images_per_s"] * epoch["seconds"] for epoch in history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--preset", default="cifar100", help="bench preset (cifar100 or smoke)")
    parser.add_argument("--setting", default="extended-class")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default=",".join(compared_methods()))
    parser.add_argument("--jobs", type=int, default=7)
    parser.add_argument("--modes", default="processes,threads")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per new model")
    parser.add_argument("--rounds", type=int, default=1, help="passes per mode, the modes alternating")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("-o", "--set", dest="overrides", action="append", default=[], help="dotted override")
    args = parser.parse_args()
    methods, modes = args.methods.split(","), args.modes.split(",")
    overrides = [*args.overrides, f"new.optim.epochs={args.epochs}", "new.optim.milestones=[]"]
    cfg = setting_config(args.preset, args.setting, overrides, args.data, args.device)
    quiet = Console(quiet=True)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        # The old model and its statistics once; every pass starts from a copy of them.
        old_path = pipeline.train_old(cfg.old, out / "base" / "old", show_progress=False)
        pipeline.compute_statistics(old_path, out / "base" / "old" / "stats.pt", device=cfg.old.device)
        walls: dict[str, list[float]] = {mode: [] for mode in modes}
        rates: dict[str, list[float]] = {mode: [] for mode in modes}
        for round_ in range(args.rounds):
            for mode in modes:
                run_out = out / f"{mode}{round_}"
                shutil.copytree(out / "base" / "old", run_out / "old")
                start = time.perf_counter()
                paths = pipeline.train_methods(cfg, run_out, methods, quiet, False, args.jobs, mode)
                wall = time.perf_counter() - start
                images = sum(images_trained(path.parent) for name, path in paths.items() if name != "old")
                walls[mode].append(wall)
                rates[mode].append(images / wall)
        runs = len(paths) - 1
        print(f"{args.device}, bench preset {args.preset} ({args.setting}), {runs} new models x {args.epochs} epochs, "
              f"{args.jobs} at a time; summed images/s over each pass's wall time")  # fmt: skip
        for mode in modes:
            passes = "".join(f"{w:8.1f} s {r:9.0f}/s" for w, r in zip(walls[mode], rates[mode], strict=True))
            print(f"{mode:<10}{passes}   median {statistics.median(rates[mode]):.0f} img/s")
        if len(modes) == 2:
            first, second = (statistics.median(rates[m]) for m in modes)
            print(f"{modes[1]} / {modes[0]}: {second / first:.3f}")


if __name__ == "__main__":
    main()

"""Real training throughput, eager steps against CUDA-graph replays (``cuda_graph``), for one or more methods.

Trains the old model once (a few epochs: its quality is not the point), computes its statistics, then trains a
new model per method and mode from the same seed, in rounds that visit every (method, mode) in turn, so drift in
the machine's speed falls on all of them. Each run's figure is the median images/s over its epochs after the
first, which holds cuDNN's kernel search, the eager warm-up and the capture. With ``independent`` among the
methods, the others' figures are also given as the loss's overhead over it in the same mode. The last epoch's
loss parts of each method's first runs are printed side by side: the graphed run must train the same model.

    python bench/bench_train_graph.py --data /tmp/cifar100 --preset paper-cifar100 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from advbct import pipeline
from advbct.presets import train_config


def images_per_s(run_dir: Path) -> float:
    history = json.loads((run_dir / "history.json").read_text())
    return statistics.median(epoch["images_per_s"] for epoch in history[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--preset", default="paper-cifar100")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default="advbct,independent")
    parser.add_argument("--modes", default="eager,graphed", help="eager, graphed or both (CPU: eager)")
    parser.add_argument("--old-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per new-model run (at least 2)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per (method, mode)")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("-o", "--set", dest="overrides", action="append", default=[], help="dotted override")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is left out of the figure")
    methods, modes = args.methods.split(","), args.modes.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        overrides = [*args.overrides, "optim.milestones=[]"]
        old_cfg = train_config("old", args.preset, None, [*overrides, f"optim.epochs={args.old_epochs}"], args.data,
                               args.device)  # fmt: skip
        old_path = pipeline.train_old(old_cfg, out / "old", show_progress=False)
        _, stats_path = pipeline.compute_statistics(old_path, data_root=args.data, device=args.device)
        rates: dict[tuple[str, str], list[float]] = {(m, mode): [] for m in methods for mode in modes}
        for round_ in range(args.rounds):
            for method, mode in rates:
                run_overrides = [*overrides, f"optim.epochs={args.epochs}", f"compat.method={method}",
                                 f"cuda_graph={mode == 'graphed'}"]  # fmt: skip
                cfg = train_config("new", args.preset, None, run_overrides, args.data, args.device)
                run_dir = out / f"{method}-{mode}{round_}"
                pipeline.train_new(cfg, run_dir, old_path, stats_path, show_progress=False)
                rates[method, mode].append(images_per_s(run_dir))
        medians = {key: statistics.median(values) for key, values in rates.items()}
        print(f"{args.device}, preset {args.preset}, batch {cfg.optim.batch_size}, {args.epochs} epochs per run; "
              f"images/s per run (median over epochs 2..{args.epochs}), in the order run")  # fmt: skip
        for (method, mode), values in rates.items():
            runs = "".join(f"{v:9.0f}" for v in values)
            line = f"{method:<22}{mode:<9}{runs}   median {medians[method, mode]:.0f}"
            if method != "independent" and ("independent", mode) in medians:
                line += f"   loss overhead {medians['independent', mode] / medians[method, mode] - 1:+.1%}"
            print(line)
        if len(modes) == 2:
            for method in methods:
                print(f"{method}: graphed / eager {medians[method, 'graphed'] / medians[method, 'eager']:.3f}")
        for method in methods:
            last = {mode: json.loads((out / f"{method}-{mode}0" / "history.json").read_text())[-1] for mode in modes}
            parts = [k for k in last[modes[0]] if k not in ("epoch", "images_per_s", "seconds")]
            print(f"{method}, last epoch ({' / '.join(modes)}): " + ", ".join(
                f"{k} " + "/".join(f"{run[k]:.4f}" for run in last.values()) for k in parts))  # fmt: skip


if __name__ == "__main__":
    main()

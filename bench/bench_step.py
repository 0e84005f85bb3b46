"""Training-step time of every compatibility method, as a ratio to the independent model's step.

Each method's step is the real one (new forward, classification, old forward where the method needs it,
compatibility loss, backward, SGD) on random data; the median of ``--repeats`` timed samples after warm-up is
reported, together with two baselines measured in the same run: the plain classification step and the
classification step plus the old model's forward pass (the cost every method that reads old embeddings
pays). The "loss overhead" column is the method's step over the latter, which is what the loss itself adds.
The timed samples are taken in interleaved rounds (every step once per round), so drift in the machine's
speed during the run falls on every row alike instead of on whichever rows ran last.

The "ops" column counts the operator calls of one step that do work (views excluded): on a GPU each is a kernel
launch the host pays for in an eager step, which is what sets an eager step's pace there when the GPU waits on the
host. It does not depend on the machine, so a CPU run shows what a loss adds to that cost.

    python bench/bench_step.py                     # CPU, the quickstart model
    python bench/bench_step.py --device cuda --preset paper-cifar100 --batch-size 512 [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from advbct.cli import train_config
from advbct.compat import CompatBatch, CompatContext, compute_class_statistics, create, list_methods, method_class
from advbct.data.batches import Preprocessing, apply_crop_flip, crop_flip_params, normalise
from advbct.models.checkpoint import ModelMeta, build_model

NUM_CLASSES = 100


def make_model(cfg, head_classes: list[int]):
    meta = ModelMeta(
        architecture=cfg.model,
        data=cfg.data,
        embedding_dim=cfg.model.embedding_dim,
        preprocessing=Preprocessing(cfg.data.image_size).to_json(),
        class_names=[str(i) for i in range(NUM_CLASSES)],
        head_classes=head_classes,
        allocation={},
        role="bench",
        generation=1,
        method="bench",
    )
    return build_model(meta)


class _OpCounter(TorchDispatchMode):
    """Counts the operator calls that reach a kernel (after autograd, decompositions included); views are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def count_ops(step: Callable[[], None]) -> int:
    with _OpCounter() as counter:
        step()
    return counter.count


def time_sample(step, per_sample: int, device: torch.device) -> float:
    """Seconds per step over ``per_sample`` consecutive steps. Several steps per sample let a GPU queue ahead as
    it does in training; one synchronisation per step would time the gaps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(per_sample):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / per_sample


def interleaved_medians(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int, per_sample: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per step of each named step, timed in ``repeats`` rounds that visit every step in turn."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            samples[name].append(time_sample(step, per_sample, device))
    return {name: statistics.median(times) for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps-per-sample", type=int, default=1, help="consecutive steps per timing sample")
    parser.add_argument("--methods", default=",".join(m for m in list_methods() if m != "independent"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the new and old networks first")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
    cfg = train_config("new", args.preset, None, None, None, args.device)
    torch.manual_seed(0)
    old_classes = list(range(0, NUM_CLASSES, 3))
    old = make_model(cfg, old_classes).to(device).eval().requires_grad_(False)
    new = make_model(cfg, list(range(NUM_CLASSES))).to(device)
    if cfg.channels_last:
        old, new = old.to(memory_format=torch.channels_last), new.to(memory_format=torch.channels_last)
    if args.compile:
        new.compile()
        old.compile()
    stats = compute_class_statistics(
        torch.randn(100 * len(old_classes), cfg.model.embedding_dim),
        torch.tensor(old_classes).repeat(100),
        NUM_CLASSES,
        "bench",
    )
    context = CompatContext(cfg.model.embedding_dim, NUM_CLASSES, stats, old.head, tuple(old_classes))
    prep = Preprocessing(cfg.data.image_size)
    images_u8 = torch.randint(0, 256, (args.batch_size, 3, cfg.data.image_size, cfg.data.image_size), dtype=torch.uint8)
    images_u8 = images_u8.to(device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    # Crops drawn once on the device, as training draws an epoch's at once: the step itself copies nothing over.
    crops = tuple(t.to(device) for t in crop_flip_params(args.batch_size, 4, torch.Generator().manual_seed(0)))
    use_amp = device.type == "cuda"

    def make_step(method_name: str | None, with_old: bool):
        method = create(method_name, context).to(device) if method_name else None
        params = list(new.parameters()) + (list(method.parameters()) if method else [])
        opt = torch.optim.SGD([p for p in params if p.requires_grad], lr=0.01, momentum=0.9)

        def step() -> None:
            x_u8 = apply_crop_flip(images_u8, 4, crops)
            x = normalise(x_u8, prep, cfg.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                emb = new(x)
                loss = F.cross_entropy(new.classify(emb.float(), labels).float(), labels)
                old_emb = None
                if with_old:
                    with torch.no_grad():
                        old_emb = old(x).float()
                if method is not None:
                    batch = CompatBatch(emb.float(), labels, old_emb, 0.5, 0, 2, new.head.weight)
                    loss = loss + method(batch).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    names = args.methods.split(",")
    needs_old = {name: method_class(name).needs_old_embeddings for name in names}
    steps = {"independent": make_step(None, False), "+ old forward": make_step(None, True)}
    steps.update({name: make_step(name, needs_old[name]) for name in names})
    medians = interleaved_medians(steps, args.repeats, args.warmup, args.steps_per_sample, device)
    ops = {name: count_ops(step) for name, step in steps.items()}
    plain, with_old = medians["independent"], medians["+ old forward"]
    compiled = ", torch.compile" if args.compile else ""
    timing = f"median of {args.repeats} interleaved rounds x {args.steps_per_sample} steps"
    print(f"device {device}, preset {args.preset}, batch {args.batch_size}{compiled}, {timing}")
    print(f"{'step':<22}{'ms':>9}{'img/s':>10}{'vs independent':>16}{'loss overhead':>15}{'ops':>7}{'loss ops':>10}")
    plain_row = f"{'independent':<22}{plain * 1e3:9.1f}{args.batch_size / plain:10.0f}{1.0:16.3f}{'':>15}"
    print(f"{plain_row}{ops['independent']:7d}")
    ratio = with_old / plain
    old_row = f"{'+ old forward':<22}{with_old * 1e3:9.1f}{args.batch_size / with_old:10.0f}{ratio:16.3f}{'':>15}"
    print(f"{old_row}{ops['+ old forward']:7d}")
    for name in names:
        t = medians[name]
        base, base_name = (with_old, "+ old forward") if needs_old[name] else (plain, "independent")
        added = ops[name] - ops[base_name]
        row = f"{name:<22}{t * 1e3:9.1f}{args.batch_size / t:10.0f}{t / plain:16.3f}{t / base - 1:+15.1%}"
        print(f"{row}{ops[name]:7d}{added:+5d} ({added / ops[base_name]:+.0%})")


if __name__ == "__main__":
    main()

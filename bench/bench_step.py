"""Training-step time of every compatibility method, as a ratio to the independent model's step.

Each method's step is the real one (new forward, classification, old forward where the method needs it,
compatibility loss, backward, SGD) on random data, together with two baselines measured in the same run: the plain
classification step and the classification step plus the old model's forward pass (the cost every method that
reads old embeddings pays). The "loss overhead" column is the method's step over the latter, which is what the loss
itself adds. The timed samples are taken in interleaved rounds (every step once per round), and each ratio is the
median of the rounds' own ratios: the two samples of a round ran seconds apart, so drift in the machine's speed
cancels in their ratio. The interval beside it is the sign test's interval for that median, at the level that makes
all the losses' intervals hold together with ``--confidence`` (Bonferroni: 1 - 0.05 / 9 = 99.4% each for nine
losses at 95%), and the last lines say which losses meet the ``--target`` overhead with that confidence, which miss
it and which the run cannot decide. So "every loss within 5%" is one claim at 95%, not nine claims at 95% each.

The "ops" column counts the operator calls of one step that do work (views excluded): on a GPU each is a kernel
launch the host pays for in an eager step, which is what sets an eager step's pace there when the GPU waits on the
host. It does not depend on the machine, so a CPU run shows what a loss adds to that cost. ``--cuda-graph``
captures every step once and times its replays (one launch per step, as ``cuda_graph`` training runs), so the
figures are what the kernels cost on the GPU. ``--compile`` compiles the networks and the losses as ``compile``
training does, which fuses a loss's operations into a few kernels. Either way the ops column counts the eager step.

    python bench/bench_step.py                     # CPU, the quickstart model
    python bench/bench_step.py --device cuda --preset paper-cifar100 --batch-size 512 [--compile | --cuda-graph]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from advbct.compat import (
    CompatBatch,
    CompatContext,
    CompatibilityMethod,
    compute_class_statistics,
    create,
    list_methods,
    reference_method,
)
from advbct.data.batches import Preprocessing, apply_crop_flip, crop_flip_params, normalise
from advbct.models.checkpoint import ModelMeta, build_model
from advbct.presets import train_config
from advbct.training.cuda_graph import CudaGraphStep, StepScalars, prepare_optimizer
from timing import median_interval, paired_ratios

NUM_CLASSES = 100
BASELINES = ("independent", "+ old forward")


def make_model(cfg, head_classes: list[int]):
    """The preset's network with a head over ``head_classes``, built as a checkpoint would be (random weights)."""
    meta = ModelMeta(
        architecture=cfg.model,
        data=cfg.data,
        preprocessing=Preprocessing(cfg.data.image_size).to_json(),
        class_names=[str(i) for i in range(NUM_CLASSES)],
        head_classes=head_classes,
        allocation={},
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


def interleaved_samples(
    steps: dict[str, Callable[[], None]], repeats: int, per_sample: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per step of each named step, one sample per round in ``repeats`` rounds that visit every step in
    turn. The steps are warmed up already (``warm_up``, or ``interleaved_medians``)."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            samples[name].append(time_sample(step, per_sample, device))
    return samples


def warm_up(steps: dict[str, Callable[[], None]], calls: int) -> dict[str, str]:
    """Call each step ``calls`` times before any timing (cuDNN's kernel search, a graph's capture); return the steps
    that raised, with the reason, so one method that cannot run (or be captured) costs its own row, not the run."""
    failures = {}
    for name, step in steps.items():
        try:
            for _ in range(calls):
                step()
        except Exception as exc:  # reported and left out by the caller
            failures[name] = f"{type(exc).__name__}: {exc}"
    return failures


def leave_out(failures: dict[str, str], *tables: dict) -> None:
    """Say why each failed step is left out and drop it from every table; a failed baseline ends the run, as no
    ratio can be measured without it."""
    for name, reason in failures.items():
        if name in BASELINES:
            raise SystemExit(f"the {name!r} baseline failed, so no ratio can be measured: {reason}")
        print(f"{name}: left out, its step failed: {reason}")
        for table in tables:
            table.pop(name, None)


def _record_ops(ops: dict[str, int], name: str, step: Callable[[], None]) -> None:
    ops[name] = count_ops(step)


def interleaved_medians(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int, per_sample: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per step of each named step over interleaved rounds (see ``interleaved_samples``), after
    ``warmup`` untimed calls of each."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples = interleaved_samples(steps, repeats, per_sample, device)
    return {name: statistics.median(times) for name, times in samples.items()}


# images, labels, training progress, epoch -> the step's outputs (progress and epoch are 0-d tensors in a graph)
Body = Callable[[torch.Tensor, torch.Tensor, float | torch.Tensor, int | torch.Tensor], dict[str, torch.Tensor]]


def print_table(
    samples: dict[str, list[float]],
    ops: dict[str, int],
    needs_old: dict[str, bool],
    batch_size: int,
    target: float,
    confidence: float,
) -> None:
    """One row per step: median ms and images/s, the paired ratios with the loss overhead's interval, the operator
    counts; then which losses meet ``target``, all intervals holding together with ``confidence``."""
    per_interval = 1.0 - (1.0 - confidence) / len(needs_old)
    print(f"{'step':<22}{'ms':>9}{'img/s':>10}{'vs independent':>16}{'loss overhead':>15}{'interval':>18}"
          f"{'ops':>7}{'loss ops':>12}")  # fmt: skip
    verdicts: dict[str, list[str]] = {"yes": [], "undecided": [], "no": []}
    for name, times in samples.items():
        median = statistics.median(times)
        vs_plain = statistics.median(paired_ratios(times, samples["independent"]))
        row = f"{name:<22}{median * 1e3:9.1f}{batch_size / median:10.0f}{vs_plain:16.3f}"
        if name in needs_old:
            base = "+ old forward" if needs_old[name] else "independent"
            overhead = median_interval([r - 1.0 for r in paired_ratios(times, samples[base])], per_interval)
            verdicts[overhead.verdict(target)].append(name)
            added = ops[name] - ops[base]
            interval = f"[{overhead.low:+.1%}, {overhead.high:+.1%}]"
            row += f"{overhead.median:+15.1%}{interval:>18}{ops[name]:7d}{added:+6d} ({added / ops[base]:+.0%})"
        else:
            row += f"{'':>33}{ops[name]:7d}"
        print(row)
    rounds = len(samples["independent"])
    joint = 1.0 - len(needs_old) * (1.0 - median_interval(samples["independent"], per_interval).coverage)
    print(f"loss overhead at most {target:.0%}, all {len(needs_old)} intervals together at {max(joint, 0.0):.1%} "
          f"confidence or more ({rounds} rounds):")  # fmt: skip
    for verdict, names in verdicts.items():
        print(f"  {verdict}: {', '.join(names) or '-'}")


def _with_scalars(body: Body, images: torch.Tensor, labels: torch.Tensor, scalars: StepScalars) -> None:
    body(images, labels, *scalars.set(0.5, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (about 100 for tight intervals)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps-per-sample", type=int, default=1, help="consecutive steps per timing sample")
    parser.add_argument("--methods", default=",".join(m for m in list_methods() if m != reference_method()))
    parser.add_argument("--target", type=float, default=0.05, help="the loss overhead to judge against (0.05 = 5%%)")
    parser.add_argument("--confidence", type=float, default=0.95, help="of all the losses' intervals together")
    speedup = parser.add_mutually_exclusive_group()
    speedup.add_argument("--compile", action="store_true", help="torch.compile the networks and the losses first")
    speedup.add_argument("--cuda-graph", action="store_true", help="capture each step once and time its replays")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.cuda_graph and device.type != "cuda":
        parser.error(f"--cuda-graph needs a CUDA device, not {device}")
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
    cfg = train_config("new", args.preset, None, None, None, args.device)
    torch.manual_seed(0)
    old_classes = list(range(0, NUM_CLASSES, 3))
    old = make_model(cfg, old_classes).to(device).eval().requires_grad_(False)
    new = make_model(cfg, list(range(NUM_CLASSES))).to(device)
    if cfg.channels_last:
        old, new = old.to(memory_format=torch.channels_last), new.to(memory_format=torch.channels_last)
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
    # A captured graph must not keep autocast's weight casts from capture time, as in cuda_graph training.
    autocast = functools.partial(
        torch.autocast, device.type, dtype=torch.bfloat16, enabled=use_amp, cache_enabled=not args.cuda_graph
    )

    models: list[torch.nn.Module] = []

    def make_body(method: CompatibilityMethod | None, with_old: bool) -> Body:
        # Each step trains its own copy of the one initialised network, as each training run has its own model: no
        # step moves the weights another step reads, and no two captured graphs write the same parameters' gradients.
        net = copy.deepcopy(new)
        models.append(net)
        params = list(net.parameters()) + (list(method.parameters()) if method else [])
        opt = torch.optim.SGD([p for p in params if p.requires_grad], lr=0.01, momentum=0.9)
        prepare_optimizer(opt, args.cuda_graph, device)

        def body(
            images: torch.Tensor, targets: torch.Tensor, progress: float | torch.Tensor, epoch: int | torch.Tensor
        ) -> dict[str, torch.Tensor]:
            x = normalise(apply_crop_flip(images, 4, crops), prep, cfg.channels_last)
            with autocast():
                emb = net(x)
                loss = F.cross_entropy(net.classify(emb.float(), targets).float(), targets)
                old_emb = None
                if with_old:
                    with torch.no_grad():
                        old_emb = old(x).float()
                if method is not None:
                    batch = CompatBatch(emb.float(), targets, old_emb, progress, epoch, 2, net.head.weight)
                    loss = loss + method(batch).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss}

        return body

    names = args.methods.split(",")
    if "independent" in names:
        parser.error("--methods: independent is the baseline, timed in every run; list the others")
    methods = {name: create(name, context).to(device) for name in names}
    needs_old = {name: method.needs_old_embeddings for name, method in methods.items()}
    bodies = {"independent": make_body(None, False), "+ old forward": make_body(None, True)}
    bodies.update({name: make_body(method, needs_old[name]) for name, method in methods.items()})
    # Eager steps get the progress and epoch as Python numbers, as eager training passes them.
    eager = {name: functools.partial(body, images_u8, labels, 0.5, 0) for name, body in bodies.items()}
    ops: dict[str, int] = {}  # counted before anything compiles; a step that fails here is left out
    counting = {name: functools.partial(_record_ops, ops, name, step) for name, step in eager.items()}
    leave_out(warm_up(counting, 1), bodies, eager, needs_old)
    if args.compile:
        # Compiled as training compiles them: both networks and the loss, which reads the progress and the epoch
        # from 0-d tensors (a Python number would compile it again for every new value).
        for module in (*models, old, *methods.values()):
            module.compile()
        scalars = StepScalars(device)
        steps = {
            name: functools.partial(_with_scalars, body, images_u8, labels, scalars) for name, body in bodies.items()
        }
        warmup = args.warmup
    elif args.cuda_graph:
        steps = {
            name: functools.partial(CudaGraphStep(warmup=args.warmup), body, images_u8, labels, 0.5, 0)
            for name, body in bodies.items()
        }
        warmup = args.warmup + 1  # the graph's eager warm-up calls, then the capture and its first replay
    else:
        steps, warmup = eager, args.warmup
    leave_out(warm_up(steps, warmup), steps, needs_old)
    if not needs_old:
        raise SystemExit("every loss's step failed (see above); nothing to compare with the baselines")
    samples = interleaved_samples(steps, args.repeats, args.steps_per_sample, device)
    mode = ", torch.compile" if args.compile else ", CUDA graph replays" if args.cuda_graph else ""
    timing = f"{args.repeats} interleaved rounds x {args.steps_per_sample} steps"
    print(f"device {device}, preset {args.preset}, batch {args.batch_size}{mode}, {timing}")
    print_table(samples, ops, needs_old, args.batch_size, args.target, args.confidence)


if __name__ == "__main__":
    main()

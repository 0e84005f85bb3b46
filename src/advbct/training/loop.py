"""The training loop for old models (classification) and new models (classification + a compatibility loss).

One loop serves both roles: an old model is a new model with no old model to stay compatible with. State is
checkpointed atomically every epoch (``last.pt``: weights, method state, optimizer, epoch) and the run resumes
from it; the finished model is ``model.pt`` (weights + metadata only). Loss parts are accumulated on the device
and read back every ``log_every`` steps, so a GPU step never waits for the host.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from advbct.compat import ClassStatistics, CompatBatch, CompatContext, create, method_info, reference_method
from advbct.compat.base import LossOutput
from advbct.config import ModelConfig, TrainConfig
from advbct.data.allocation import Allocation
from advbct.data.batches import BatchStream, Preprocessing, normalise
from advbct.data.images import ImageSet
from advbct.distributed import (
    World,
    convert_batchnorm,
    current_world,
    gather_local_grad,
    gather_rows,
    gather_with_grad,
    local_positions,
    resolve_device,
)
from advbct.models.checkpoint import (
    GLOBAL_RNG_LOCK,
    CheckpointError,
    ModelMeta,
    atomic_save,
    build_model,
    read_checkpoint,
    read_meta,
    save_checkpoint,
)
from advbct.models.embedding import EmbeddingModel
from advbct.models.preprocessing import training_preprocessing
from advbct.training.cuda_graph import (
    CudaGraphStep,
    StepScalars,
    check_cuda_graph_setup,
    prepare_optimizer,
    set_learning_rate,
)
from advbct.training.schedule import learning_rate

Role = Literal["old", "new"]


@dataclass(frozen=True)
class OldModel:
    """The frozen model a new model must stay compatible with."""

    model: EmbeddingModel
    meta: ModelMeta
    path: Path


# The architecture fields that decide the shapes of the weights an old checkpoint hands to a new model.
WEIGHT_SHAPING_FIELDS = (
    "backbone",
    "backbone_kwargs",
    "small_input",
    "small_input_pool",
    "small_input_stride",
    "embedding_dim",
)


def check_compatible_setup(cfg: TrainConfig, old: OldModel, stats: ClassStatistics | None, classes: tuple) -> None:
    """Refuse a new-model run whose old checkpoint or statistics cannot match it, before any work is done."""
    if old.meta.embedding_dim != cfg.model.embedding_dim:
        raise CheckpointError(
            f"old checkpoint {old.path} embeds to dim {old.meta.embedding_dim}, but the new model is configured "
            f"with embedding_dim {cfg.model.embedding_dim}; cross-model search needs equal dimensions"
        )
    if tuple(old.meta.class_names) != tuple(classes):
        raise CheckpointError(f"old checkpoint {old.path} was trained on a different class list than this data")
    if old.meta.prep.image_size != cfg.data.image_size:
        raise CheckpointError(
            f"old checkpoint {old.path} expects {old.meta.prep.image_size}px images, this run uses "
            f"{cfg.data.image_size}px"
        )
    if cfg.init_from_old:
        old_arch = old.meta.architecture
        differing = [
            f"model.{name}" for name in WEIGHT_SHAPING_FIELDS if getattr(cfg.model, name) != getattr(old_arch, name)
        ]
        if differing:
            raise CheckpointError(
                f"init_from_old: the old checkpoint {old.path} differs from this model in {', '.join(differing)}, "
                "so its weights cannot start this network"
            )
    if stats is not None and stats.old_model_id != old.meta.model_id:
        raise CheckpointError(
            f"statistics were computed from model {stats.old_model_id}, not from the old checkpoint {old.path} "
            f"({old.meta.model_id}); run `advbct stats` on it"
        )


def start_from_old(model: EmbeddingModel, arch: ModelConfig, old: OldModel) -> None:
    """Copy the old network (backbone, projection, embedding batch norm) into the new model, and the old classes'
    classifier rows into its wider head when both heads are of one kind. ``check_compatible_setup`` has already
    refused an old checkpoint whose architecture differs.

    A new model fine-tuned from the deployed one starts out exactly compatible with the old gallery instead of
    in an unrelated embedding space. The paper starts old and new alike from ImageNet weights, a shared start
    that from-scratch training on a CPU does not have.
    """
    state = {key: value for key, value in old.model.state_dict().items() if not key.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(key.startswith("head.") for key in missing), (missing, unexpected)
    if arch.head == old.meta.architecture.head:
        rows = torch.as_tensor(old.meta.head_classes, dtype=torch.long, device=model.head.weight.device)
        with torch.no_grad():
            model.head.weight[rows] = old.model.head.weight.to(model.head.weight)


def _comparable(tree: dict) -> dict:
    """A run's config without what may legitimately differ between machines (data location, device) or between
    the sessions of one run (``cuda_graph`` changes how a step is launched, not what it computes)."""
    tree = json.loads(json.dumps(tree))
    tree.pop("device", None)
    tree.pop("cuda_graph", None)
    tree.pop("checkpoint_every", None)
    tree.get("data", {}).pop("root", None)
    return tree


def _with_defaults(tree: dict) -> dict:
    """A saved config with the options added since it was written filled in at their defaults (which keep the
    old behaviour), so a folder from an earlier version is not refused for lacking them."""
    try:
        return TrainConfig.model_validate(tree).model_dump(mode="json")
    except ValidationError:
        return tree


def check_same_run(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to resume or reuse a run folder that was made with another configuration."""
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        return
    saved = _comparable(_with_defaults(json.loads(saved_path.read_text())))
    current = _comparable(cfg.model_dump(mode="json"))
    if saved != current:
        differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        raise CheckpointError(
            f"run folder {run_dir} was made with a different config (sections {', '.join(differing)} differ); "
            "use another --out, or delete the folder to start again"
        )


WHITENING_SAMPLE = 2000


def _whitening_sample(images_u8: torch.Tensor, prep: Preprocessing, seed: int) -> torch.Tensor:
    """A seeded sample of at most WHITENING_SAMPLE training images, normalised, to set a whitened stem from:
    the patch covariance of 2,000 images is already stable, and every process of a run draws the same ones."""
    count = min(WHITENING_SAMPLE, images_u8.shape[0])
    chosen = torch.randperm(images_u8.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return normalise(images_u8[chosen], prep)


def _head_label_map(head_classes: list[int], num_classes: int) -> torch.Tensor:
    mapping = torch.full((num_classes,), -1, dtype=torch.long)
    mapping[torch.as_tensor(head_classes, dtype=torch.long)] = torch.arange(len(head_classes))
    return mapping


class _Meter:
    """Sums of loss parts kept on the device; ``read`` syncs once and resets. A step's parts are stacked into one
    tensor and added at once: two kernel launches per step whatever the number of parts, where one add per part
    cost the host a launch each."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None
        self.count = 0

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        # The stack is a new tensor, never a part itself: a CUDA graph's outputs are overwritten in place by the
        # next replay.
        values = torch.stack([value.detach().float() for value in parts.values()])
        if self.sums is None:
            self.names, self.sums = list(parts), values
        elif list(parts) != self.names:
            raise ValueError(f"loss parts changed within a run: {self.names} then {list(parts)}")
        else:
            self.sums = self.sums + values
        self.count += 1

    def read(self, world: World | None = None) -> dict[str, float]:
        """Means since the last read, averaged over ranks (one all-reduce) when training is distributed."""
        if self.sums is None:
            return {}
        values = self.sums / max(1, self.count)
        if world is not None and world.distributed:
            dist.all_reduce(values)
            values = values / world.size
        names, self.sums, self.count = self.names, None, 0
        return dict(sorted(zip(names, values.tolist(), strict=True)))


def train_model(
    cfg: TrainConfig,
    run_dir: Path,
    role: Role,
    train_set: ImageSet,
    allocation: Allocation,
    old: OldModel | None = None,
    stats: ClassStatistics | None = None,
    resume: bool = True,
    show_progress: bool = True,
) -> Path:
    """Train one model into ``run_dir``; returns the path of the finished ``model.pt``."""
    run_dir = Path(run_dir)
    final_path, last_path = run_dir / "model.pt", run_dir / "last.pt"
    if resume:
        check_same_run(run_dir, cfg)
    if resume and final_path.is_file():
        return final_path
    if role == "new" and old is None and method_info(cfg.compat.method).needs_old_model:
        raise CheckpointError(f"method {cfg.compat.method!r} needs an old checkpoint (--old)")
    if cfg.init_from_old and (role != "new" or old is None):
        raise CheckpointError("init_from_old needs a new-model run with an old checkpoint (--old)")
    if old is not None:
        check_compatible_setup(cfg, old, stats, train_set.classes)

    world = current_world()
    device = resolve_device(cfg.device)
    indices = allocation.old_indices if role == "old" else allocation.new_indices
    head_classes = list(allocation.old_classes) if role == "old" else list(range(train_set.num_classes))
    # A model fine-tuned from the old one keeps the inputs the old weights were trained on.
    prep = (
        old.meta.prep if cfg.init_from_old else training_preprocessing(cfg.model, cfg.data, train_set.images[indices])
    )
    meta = ModelMeta(
        architecture=cfg.model,
        data=cfg.data,
        preprocessing=prep.to_json(),
        class_names=list(train_set.classes),
        head_classes=head_classes,
        allocation=allocation.summary(),
        generation=1 if old is None else old.meta.generation + 1,
        method="classification" if role == "old" else cfg.compat.method,
        compatible_with=None if old is None else {"model_id": old.meta.model_id, "path": str(old.path)},
    )

    # Seeding and every draw of initial weights (backbone, heads, the method's own parameters) under one hold of the
    # lock; nothing after initialisation draws from the global generator (batches and crops have their own).
    with GLOBAL_RNG_LOCK:
        torch.manual_seed(cfg.seed)
        model = build_model(meta).to(device)
        if cfg.init_from_old:
            start_from_old(model, cfg.model, old)
        elif cfg.model.whitened_stem and not (resume and last_path.is_file()):
            model.whiten_stem(_whitening_sample(train_set.images[indices], prep, cfg.seed).to(device))
        method = _build_method(cfg, role, train_set.num_classes, old, stats).to(device)
    needs_old = role == "new" and method.needs_old_embeddings
    batch_wide = world.distributed and role == "new" and method.batch_wide
    old_net = old.model.to(device).eval().requires_grad_(False) if (old is not None and needs_old) else None
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        old_net = old_net.to(memory_format=torch.channels_last) if old_net is not None else None
    if world.distributed and cfg.sync_batchnorm:
        model = convert_batchnorm(model, device)
    if cfg.cuda_graph:
        check_cuda_graph_setup(device, world.distributed, cfg.compile)
    if cfg.compile:
        # In place: the parameters and state-dict keys stay those of the plain module, so checkpoints and resume
        # do not depend on the option.
        model.compile()
        method.compile()
        if old_net is not None:
            old_net.compile()
    params = [p for p in [*model.parameters(), *method.parameters()] if p.requires_grad]
    optimizer = torch.optim.SGD(
        params,
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        fused=True if cfg.cuda_graph else None,
    )

    start_epoch, start_step = 0, 0
    if resume and last_path.is_file():
        blob = read_checkpoint(last_path)
        meta = read_meta(blob, last_path)
        prep = meta.prep  # a run goes on with the transform it started with
        model.load_state_dict(blob["model"])
        method.load_state_dict(blob["method"])
        optimizer.load_state_dict(blob["optimizer"])
        start_epoch, start_step = int(blob["epoch"]), int(blob.get("step", 0))
    prepare_optimizer(optimizer, cfg.cuda_graph, device)

    step_module = TrainStep(model, method, role == "new", cfg.optim.label_smoothing)
    if world.distributed:
        step_module = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None)
    label_map = _head_label_map(head_classes, train_set.num_classes).to(device)
    # On a GPU the uint8 training images live on the device: batches are gathered and augmented there, and
    # nothing crosses the PCIe bus per step. On the CPU the same code runs in place.
    stream = BatchStream(
        train_set.images[indices].to(device),
        train_set.labels[indices].to(device),
        cfg.optim.batch_size,
        cfg.seed,
        cfg.data.augment,
        world,
    )
    if len(stream) == 0:
        raise ValueError(f"{role} training set is empty")
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    writer = _tensorboard(run_dir / "tb") if world.is_main else None
    steps_per_epoch, epochs = len(stream), cfg.optim.epochs
    total_steps = steps_per_epoch * epochs
    use_amp = cfg.amp and device.type == "cuda"
    # A captured graph must not keep autocast's weight casts from capture time: its cache is off then.
    autocast = functools.partial(
        torch.autocast, device.type, dtype=torch.bfloat16, enabled=use_amp, cache_enabled=not cfg.cuda_graph
    )
    graphed = CudaGraphStep() if cfg.cuda_graph else None
    scalars = StepScalars(device) if cfg.compile else None
    # Every batch has one shape, so cuDNN's one-off search for the fastest convolution kernels pays off.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    # The old model usually shares the new one's normalisation; then its input is the batch already prepared.
    same_prep = old is not None and old.meta.prep == prep
    history: list[dict] = json.loads(blob.get("history", "[]")) if start_epoch or start_step else []

    def train_step(
        images_u8: torch.Tensor, labels: torch.Tensor, progress: float | torch.Tensor, epoch: int | torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch; returns the loss parts. Reads nothing from the host that changes
        during a run except its arguments, which may be device tensors, so one CUDA graph capture of it serves
        the whole run (``cuda_graph``)."""
        images = normalise(images_u8, prep, cfg.channels_last)
        old_emb = None
        if old_net is not None:
            with torch.no_grad(), autocast():
                old_images = images if same_prep else normalise(images_u8, old.meta.prep, cfg.channels_last)
                old_emb = old_net(old_images).float()
        with autocast():
            cls_loss, out = step_module(images, labels, label_map[labels], old_emb, progress, epoch, epochs, batch_wide)
        loss = cls_loss + out.total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # Detached, so the step's autograd graph is freed here rather than kept alive until the next step.
        return {name: value.detach() for name, value in {"loss": loss, "cls": cls_loss, **out.parts}.items()}

    def save_state(epoch: int, step: int) -> None:
        """last.pt resumes at (epoch, step); rank 0 writes it, every rank waits until it is complete."""
        if world.is_main:
            state = {"model": model.state_dict(), "method": method.state_dict(), "optimizer": optimizer.state_dict()}
            atomic_save(
                {"meta": meta.model_dump_json(), **state, "epoch": epoch, "step": step, "history": json.dumps(history)},
                last_path,
            )
        world.barrier()

    with _run_progress(show_progress and world.is_main) as progress:
        done = start_epoch * steps_per_epoch + start_step
        task = progress.add_task(f"{role} {meta.method}", total=total_steps, completed=done, info="")
        for epoch in range(start_epoch, epochs):
            step_module.train()
            meter, epoch_meter = _Meter(), _Meter()
            started, seen = time.perf_counter(), 0
            first_step = start_step if epoch == start_epoch else 0
            for step, (images_u8, labels) in enumerate(stream.epoch(epoch, first_step), start=first_step):
                global_step = epoch * steps_per_epoch + step
                set_learning_rate(optimizer, learning_rate(cfg.optim, global_step, steps_per_epoch))
                images_u8 = images_u8.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                progress_fraction = global_step / max(1, total_steps - 1)
                if scalars is not None:
                    parts = train_step(images_u8, labels, *scalars.set(progress_fraction, epoch))
                elif graphed is None:
                    parts = train_step(images_u8, labels, progress_fraction, epoch)
                else:
                    parts = graphed(train_step, images_u8, labels, progress_fraction, epoch)
                meter.add(parts)
                epoch_meter.add(parts)
                seen += labels.shape[0] * world.size
                if (step + 1) % cfg.log_every == 0 or step + 1 == steps_per_epoch:
                    values = meter.read(world)
                    if writer is not None:
                        for name, value in values.items():
                            writer.add_scalar(f"train/{name}", value, global_step)
                        writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)
                    info = " ".join(f"{k}={v:.3f}" for k, v in values.items())
                    progress.update(task, completed=global_step + 1, info=f"ep {epoch + 1}/{epochs} {info}")
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps_per_epoch:
                    save_state(epoch, step + 1)
            elapsed = time.perf_counter() - started
            summary = {
                "epoch": epoch,
                **epoch_meter.read(world),
                "images_per_s": seen / max(elapsed, 1e-9),
                "seconds": elapsed,
            }
            history.append(summary)
            if _EpochLines.enabled and world.is_main:
                losses = " ".join(f"{k}={v:.3f}" for k, v in summary.items() if k in ("loss", "cls", "adv", "bound"))
                print(f"  {role} {meta.method}: epoch {epoch + 1}/{epochs} {losses} ({elapsed:.0f} s)", flush=True)
            if writer is not None:
                writer.add_scalar("train/images_per_s", summary["images_per_s"], epoch)
            save_state(epoch + 1, 0)
    if writer is not None:
        writer.close()
    meta.metrics["train_history"] = history
    if world.is_main:
        save_checkpoint(final_path, model.cpu().to(memory_format=torch.contiguous_format), meta)
        (run_dir / "history.json").write_text(json.dumps(history, indent=2))
    world.barrier()
    return final_path


class TrainStep(nn.Module):
    """The model and the compatibility method as one module, so DistributedDataParallel sees every trainable
    parameter of a step (backbone, heads, discriminator, radius weights) in one forward call."""

    def __init__(self, model: EmbeddingModel, method: nn.Module, pass_classifier: bool, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.method, self.pass_classifier = model, method, pass_classifier
        self.label_smoothing = label_smoothing

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        head_labels: torch.Tensor,
        old_emb: torch.Tensor | None,
        progress: float | torch.Tensor,
        epoch: int | torch.Tensor,
        num_epochs: int,
        batch_wide: bool,
    ) -> tuple[torch.Tensor, LossOutput]:
        new_emb = self.model(images).float()
        logits = self.model.classify(new_emb, head_labels).float()
        cls_loss = F.cross_entropy(logits, head_labels, label_smoothing=self.label_smoothing)
        local_rows = None
        if batch_wide:
            # The method sees the global batch; see advbct.distributed for why gradients then come out right.
            world = current_world()
            if self.method.local_anchors:
                local_rows = local_positions(new_emb.shape[0], world, new_emb.device)
                new_emb = gather_local_grad(new_emb, world)
            else:
                new_emb = gather_with_grad(new_emb, world)
            labels = gather_rows(labels, world)
            old_emb = gather_rows(old_emb, world) if old_emb is not None else None
        classifier = self.model.head.weight if self.pass_classifier else None
        batch = CompatBatch(new_emb, labels, old_emb, progress, epoch, num_epochs, classifier, local_rows)
        return cls_loss, self.method(batch)


def _build_method(
    cfg: TrainConfig, role: Role, num_classes: int, old: OldModel | None, stats: ClassStatistics | None
) -> nn.Module:
    name = reference_method() if role == "old" else cfg.compat.method
    old_head = None
    if old is not None:
        old_head = copy.deepcopy(old.model.head).eval().requires_grad_(False)
    context = CompatContext(
        embedding_dim=cfg.model.embedding_dim,
        num_classes=num_classes,
        statistics=stats,
        old_head=old_head,
        old_head_classes=tuple(old.meta.head_classes) if old is not None else None,
    )
    options = {} if role == "old" else dict(cfg.compat.options)
    return create(name, context, **options)


def _tensorboard(path: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))


class _EpochLines:
    """Whether this process reports each finished epoch as one printed line: runs in processes of their own
    cannot share the parent's progress display, and a line per epoch still shows that they move."""

    enabled = False


def report_epochs_as_lines() -> None:
    _EpochLines.enabled = True


class _SharedDisplay:
    """The one progress display of runs training side by side in threads of this process: rich shows one live
    display at a time, so while ``shared_progress`` is open each run adds its bar to this one."""

    progress: Progress | None = None


@contextmanager
def shared_progress(enabled: bool) -> Iterator[None]:
    """Open one display for the runs that train in this process's threads until the block ends."""
    if not enabled:
        yield
        return
    with _progress(True) as display:
        _SharedDisplay.progress = display
        try:
            yield
        finally:
            _SharedDisplay.progress = None


def _run_progress(enabled: bool) -> AbstractContextManager[Progress]:
    """A run's progress display: its own, or its bar in the shared one (which the run leaves open)."""
    if enabled and _SharedDisplay.progress is not None:
        return nullcontext(_SharedDisplay.progress)
    return _progress(enabled)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
    )

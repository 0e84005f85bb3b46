"""The training loop for old models (classification) and new models (classification + a compatibility loss).

One loop serves both roles: an old model is a new model with no old model to stay compatible with. It puts
together the parts of a run, each in a module of its own: the run folder (``run_folder.py``: resume, config
check, checkpoints), the setup (``setup.py``: model, method, optimizer, old network), the step
(``step.py``: eager, compiled or replayed from a CUDA graph) and the logger (``logger.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from advbct.compat import ClassStatistics
from advbct.config import TrainConfig
from advbct.data.allocation import Allocation
from advbct.data.batches import BatchStream
from advbct.data.images import DataError, ImageSet
from advbct.distributed import World, current_world, resolve_device
from advbct.models.checkpoint import ModelMeta
from advbct.training.cuda_graph import prepare_optimizer, set_learning_rate
from advbct.training.logger import LossMeter, TrainingLogger
from advbct.training.run_folder import Position, RunFolder, check_same_run
from advbct.training.schedule import learning_rate
from advbct.training.setup import (
    OldModel,
    Role,
    TrainingParts,
    build_parts,
    check_request,
    head_label_map,
    model_meta,
    training_indices,
)
from advbct.training.step import OptimisationStep, Step, TrainStep, make_step


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
    world = current_world()
    folder = RunFolder(run_dir, world)
    if resume:
        check_same_run(folder.path, cfg)
    if resume and folder.finished:
        return folder.final
    device = resolve_device(cfg.device)
    check_request(cfg, role, old, stats, train_set.classes, device, world.distributed)
    indices = training_indices(role, allocation)
    meta = model_meta(cfg, role, train_set, allocation, old)
    resuming = resume and folder.resumable
    train_images = train_set.images[indices]
    parts = build_parts(cfg, meta, train_images, old, stats, device, resuming, world.distributed)
    position = Position()
    if resuming:
        meta, position = folder.resume(parts)
    prepare_optimizer(parts.optimizer, cfg.cuda_graph, device)
    module, step = _build_step(cfg, parts, meta, old, device, world, train_set.num_classes)
    # On a GPU the uint8 training images live on the device: batches are gathered and augmented there, and
    # nothing crosses the PCIe bus per step. On the CPU the same code runs in place.
    images, labels = train_images.to(device), train_set.labels[indices].to(device)
    stream = BatchStream(images, labels, cfg.optim.batch_size, cfg.seed, cfg.data.augment, world)
    if len(stream) == 0:
        raise DataError(f"{role} training set is empty")
    folder.write_config(cfg)
    # Every batch has one shape, so cuDNN's one-off search for the fastest convolution kernels pays off.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    logger = TrainingLogger(f"{role} {meta.method}", world, folder.tensorboard, show_progress, cfg.optim.epochs)
    with logger:
        _Epochs(cfg, module, step, stream, parts, folder, meta, logger, device).run(position)
    model = parts.model.cpu().to(memory_format=torch.contiguous_format)
    return folder.finish(model, meta, position.history)


def _build_step(
    cfg: TrainConfig,
    parts: TrainingParts,
    meta: ModelMeta,
    old: OldModel | None,
    device: torch.device,
    world: World,
    num_classes: int,
) -> tuple[nn.Module, Step]:
    """The module whose parameters train (wrapped for DDP in a distributed run) and the step that updates them."""
    new_model = meta.role == "new"
    module: nn.Module = TrainStep(parts.model, parts.method, new_model, cfg.optim.label_smoothing)
    if world.distributed:
        module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    prep = meta.prep
    old_prep = None if old is None or old.meta.prep == prep else old.meta.prep
    label_map = head_label_map(meta.head_classes, num_classes).to(device)
    batch_wide = world.distributed and new_model and parts.method.batch_wide
    body = OptimisationStep(
        cfg, module, parts.optimizer, parts.old_net, (prep, old_prep), label_map, batch_wide, device
    )
    return module, make_step(cfg, body, device)


@dataclass
class _Epochs:
    """The epochs of one run from a position on: steps, logging, and a checkpoint after every epoch (and every
    ``checkpoint_every`` steps within one)."""

    cfg: TrainConfig
    module: nn.Module
    step: Step
    stream: BatchStream
    parts: TrainingParts
    folder: RunFolder
    meta: ModelMeta
    logger: TrainingLogger
    device: torch.device

    def run(self, position: Position) -> None:
        """Train from ``position`` to the last epoch, advancing ``position`` (and its history) as epochs finish."""
        steps_per_epoch = len(self.stream)
        self.logger.start(steps_per_epoch * self.cfg.optim.epochs, position.epoch * steps_per_epoch + position.step)
        for epoch in range(position.epoch, self.cfg.optim.epochs):
            first_step = position.step if epoch == position.epoch else 0
            summary = self._epoch(epoch, first_step, position.history)
            position.history.append(summary)
            self.logger.epoch(summary)
            position.epoch, position.step = epoch + 1, 0
            self.folder.save_state(self.parts, self.meta, position)

    def _epoch(self, epoch: int, first_step: int, history: list[dict]) -> dict:
        """Run one epoch from ``first_step``; its summary: mean loss parts, images/s and seconds."""
        cfg, world, optimizer = self.cfg, self.folder.world, self.parts.optimizer
        steps_per_epoch = len(self.stream)
        total_steps = steps_per_epoch * cfg.optim.epochs
        self.module.train()
        meter, epoch_meter = LossMeter(), LossMeter()
        started, seen = time.perf_counter(), 0
        for step, (images_u8, labels) in enumerate(self.stream.epoch(epoch, first_step), start=first_step):
            global_step = epoch * steps_per_epoch + step
            set_learning_rate(optimizer, learning_rate(cfg.optim, global_step, steps_per_epoch))
            images_u8 = images_u8.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            parts = self.step(images_u8, labels, global_step / max(1, total_steps - 1), epoch)
            meter.add(parts)
            epoch_meter.add(parts)
            seen += labels.shape[0] * world.size
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps_per_epoch:
                self.logger.steps(meter.read(world), global_step, epoch, optimizer.param_groups[0]["lr"])
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps_per_epoch:
                self.folder.save_state(self.parts, self.meta, Position(epoch, step + 1, history))
        elapsed = time.perf_counter() - started
        return {
            "epoch": epoch,
            **epoch_meter.read(world),
            "images_per_s": seen / max(elapsed, 1e-9),
            "seconds": elapsed,
        }

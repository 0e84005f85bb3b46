"""One optimisation step, and the three ways a run launches it.

``OptimisationStep`` is what a step computes: normalise the uint8 batch, embed it with the old network where the
method needs old embeddings, the classification loss plus the method's loss, backward, SGD. ``Step`` is how the
loop calls it, with the batch as device tensors and the training progress and epoch as numbers:

- ``EagerStep`` hands the numbers on as they are (a loss then computes its schedules in double precision);
- ``CompiledStep`` hands them as 0-d device tensors refilled in place, so a compiled loss is not recompiled for
  every new value;
- ``GraphedStep`` replays the step from one CUDA graph capture (``cuda_graph.py``).
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from advbct.compat import CompatBatch
from advbct.compat.base import LossOutput
from advbct.config import TrainConfig
from advbct.data.batches import Preprocessing, normalise
from advbct.distributed import current_world, gather_local_grad, gather_rows, gather_with_grad, local_positions
from advbct.models.embedding import EmbeddingModel
from advbct.training.cuda_graph import CudaGraphStep, StepScalars

LossParts = dict[str, torch.Tensor]


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
        """The classification loss and the method's output. ``head_labels`` index the classifier's rows (an old
        model's head covers only the old classes), ``labels`` are the dataset's. With ``batch_wide`` the method
        sees the whole distributed batch, gathered from every rank."""
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


class OptimisationStep:
    """One step on a batch; returns the loss parts. It reads nothing from the host that changes during a run except
    its arguments, which may be device tensors, so one CUDA graph capture of it serves the whole run."""

    def __init__(
        self,
        cfg: TrainConfig,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        old_net: EmbeddingModel | None,
        preps: tuple[Preprocessing, Preprocessing | None],
        label_map: torch.Tensor,
        batch_wide: bool,
        device: torch.device,
    ):
        self.cfg, self.module, self.optimizer, self.old_net = cfg, module, optimizer, old_net
        # The old model's preprocessing, or None where it is the new one's: then its input is the batch as prepared.
        self.prep, self.old_prep = preps
        self.label_map, self.batch_wide = label_map, batch_wide
        use_amp = cfg.amp and device.type == "cuda"
        # A captured graph must not keep autocast's weight casts from capture time: its cache is off then.
        self.autocast = functools.partial(
            torch.autocast, device.type, dtype=torch.bfloat16, enabled=use_amp, cache_enabled=not cfg.cuda_graph
        )

    def __call__(
        self, images_u8: torch.Tensor, labels: torch.Tensor, progress: float | torch.Tensor, epoch: int | torch.Tensor
    ) -> LossParts:
        channels_last = self.cfg.channels_last
        images = normalise(images_u8, self.prep, channels_last)
        old_emb = None
        if self.old_net is not None:
            with torch.no_grad(), self.autocast():
                old_images = images if self.old_prep is None else normalise(images_u8, self.old_prep, channels_last)
                old_emb = self.old_net(old_images).float()
        with self.autocast():
            head_labels = self.label_map[labels]
            epochs = self.cfg.optim.epochs
            cls_loss, out = self.module(images, labels, head_labels, old_emb, progress, epoch, epochs, self.batch_wide)
        loss = cls_loss + out.total
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        # Detached, so the step's autograd graph is freed here rather than kept alive until the next step.
        return {name: value.detach() for name, value in {"loss": loss, "cls": cls_loss, **out.parts}.items()}


class Step(Protocol):
    """How the loop runs one step: the batch as device tensors, the training progress (fraction of steps done) and
    the epoch index as numbers."""

    def __call__(self, images_u8: torch.Tensor, labels: torch.Tensor, progress: float, epoch: int) -> LossParts: ...


class EagerStep:
    """The step run as written, its scalars handed on as Python numbers."""

    def __init__(self, body: OptimisationStep):
        self.body = body

    def __call__(self, images_u8: torch.Tensor, labels: torch.Tensor, progress: float, epoch: int) -> LossParts:
        return self.body(images_u8, labels, progress, epoch)


class CompiledStep:
    """The step of a compiled run: its scalars as 0-d device tensors, refilled in place (``StepScalars``)."""

    def __init__(self, body: OptimisationStep, device: torch.device):
        self.body, self.scalars = body, StepScalars(device)

    def __call__(self, images_u8: torch.Tensor, labels: torch.Tensor, progress: float, epoch: int) -> LossParts:
        return self.body(images_u8, labels, *self.scalars.set(progress, epoch))


class GraphedStep:
    """The step captured once into a CUDA graph and replayed; its outputs are overwritten by the next call."""

    def __init__(self, body: OptimisationStep):
        self.body, self.graph = body, CudaGraphStep()

    def __call__(self, images_u8: torch.Tensor, labels: torch.Tensor, progress: float, epoch: int) -> LossParts:
        return self.graph(self.body, images_u8, labels, progress, epoch)


def make_step(cfg: TrainConfig, body: OptimisationStep, device: torch.device) -> Step:
    """The implementation the run's options ask for (``cuda_graph`` and ``compile`` exclude each other)."""
    if cfg.cuda_graph:
        return GraphedStep(body)
    if cfg.compile:
        return CompiledStep(body, device)
    return EagerStep(body)

"""Training steps replayed from CUDA graphs.

A small network at 32x32 keeps the GPU busy for a few milliseconds per step, while Python and the kernel launches of
the forward, the compatibility loss, the backward and SGD take about as long on the host: the GPU then waits on the
CPU. Capturing the whole step once and replaying it costs one launch per step. The step must not synchronise with
the host (``tests/test_host_sync.py`` checks every loss and the batch path) and must read everything that changes
between steps from device tensors: the batch is copied into fixed input buffers, the training progress and the
epoch (AdvBCT's adversarial weight) are 0-d tensors, and the learning rate is a 0-d tensor that fused SGD reads on
the device. One capture then serves the whole run. That matters beyond the capture's own cost: each capture
synchronises the whole device, which stalls every other run training on it at the same time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from advbct.config import ConfigError

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def check_cuda_graph_setup(device: torch.device, distributed: bool, compiled: bool) -> None:
    """Refuse the settings a captured step cannot honour, before any training starts."""
    problems = []
    if device.type != "cuda":
        problems.append(f"needs a CUDA device, the run uses {device}")
    if distributed:
        problems.append("is for single-GPU runs; under torchrun DDP's gradient hooks run outside any graph")
    if compiled:
        problems.append("and compile are alternatives; set one of them")
    if problems:
        raise ConfigError("cuda_graph " + "; ".join(problems))


def prepare_optimizer(optimizer: torch.optim.SGD, graphed: bool, device: torch.device) -> None:
    """Put each parameter group in the form the run's steps need. A graphed step needs fused SGD with the learning
    rate in a 0-d tensor on ``device`` (filled in place by ``set_learning_rate``), so a captured step follows the
    schedule: the multi-tensor SGD turns a tensor rate back into a host number, which a capture forbids. An eager
    step keeps a float rate and the optimizer it was built with. Called after a resume as well, since a saved
    optimizer state carries the form of the run that saved it."""
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        if graphed:
            group["lr"], group["fused"], group["foreach"] = torch.tensor(lr, device=device), True, None
        else:
            group["lr"], group["fused"] = lr, optimizer.defaults.get("fused")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate: in place where it is a device tensor (a graphed run), by assignment elsewhere."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class StepScalars:
    """The training progress and the epoch as 0-d tensors on the device, refilled in place at every step: the inputs
    a captured step replays with (``CudaGraphStep``) and a compiled loss reads (``compile``). Handed Python numbers
    instead, a compiled loss compiles again for every new value (the progress changes at every step) until torch
    reaches its recompile limit and runs the loss eagerly from then on. Filling from a Python number launches a
    kernel and never waits on it."""

    def __init__(self, device: torch.device):
        self.progress = torch.zeros((), device=device)
        self.epoch = torch.zeros((), device=device)

    def set(self, progress: float, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.progress.fill_(progress)
        self.epoch.fill_(epoch)
        return self.progress, self.epoch


class CudaGraphStep:
    """Runs ``step(images, labels, progress, epoch)`` eagerly for the first ``warmup`` calls (on a side stream, as
    CUDA graph capture asks, so cuDNN's kernel search and the optimizer's momentum buffers are done before capture),
    then captures it once and replays the graph. ``progress`` and ``epoch`` reach the step as 0-d tensors. The
    returned tensors are the graph's own outputs, overwritten by the next call."""

    def __init__(self, warmup: int = 3):
        self.warmup_left = warmup
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None  # the static images and labels
        self.scalars: StepScalars | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: dict[str, torch.Tensor] = {}

    def __call__(
        self, step: Step, images: torch.Tensor, labels: torch.Tensor, progress: float, epoch: int
    ) -> dict[str, torch.Tensor]:
        if self.batch is None:
            self.batch = (torch.empty_like(images), torch.empty_like(labels))
            self.scalars = StepScalars(images.device)
        static_images, static_labels = self.batch
        if images.shape != static_images.shape or labels.shape != static_labels.shape:
            raise ValueError(
                f"cuda_graph needs batches of one shape: captured {tuple(static_images.shape)}, "
                f"got {tuple(images.shape)}"
            )
        static_images.copy_(images)
        static_labels.copy_(labels)
        inputs = (static_images, static_labels, *self.scalars.set(progress, epoch))
        if self.warmup_left > 0:
            self.warmup_left -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs = step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return outputs
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.outputs = step(*inputs)
            self.graph = graph
        self.graph.replay()
        return self.outputs

"""Training steps replayed from CUDA graphs.

A small network at 32x32 keeps the GPU busy for a few milliseconds per step, while Python and the kernel launches of
the forward, the compatibility loss, the backward and SGD take about as long on the host: the GPU then waits on the
CPU. Capturing the whole step once and replaying it costs one launch per step. The step must not synchronise with
the host (``tests/test_host_sync.py`` checks every loss and the batch path) and must read everything that changes
between steps from device tensors: the batch is copied into fixed input buffers and the training progress is a
0-d tensor. What changes only at epoch boundaries (the learning rate of a multi-step schedule, the adversarial
weight per epoch) is baked into the graph, and a new capture is made when it changes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


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
        raise ValueError("cuda_graph " + "; ".join(problems))


class CudaGraphStep:
    """Runs ``step(images, labels, progress)`` eagerly for the first ``warmup`` calls (on a side stream, as CUDA
    graph capture asks, so cuDNN's kernel search and the optimizer's momentum buffers are done before capture),
    then captures it and replays the graph. ``key`` names what the step has baked in (epoch, learning rate): when
    it changes, the step passed with it is captured again. The returned tensors are the graph's own outputs,
    overwritten by the next call."""

    def __init__(self, warmup: int = 3):
        self.warmup_left = warmup
        self.inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: Hashable = None
        self.outputs: dict[str, torch.Tensor] = {}

    def __call__(
        self, step: Step, images: torch.Tensor, labels: torch.Tensor, progress: float, key: Hashable
    ) -> dict[str, torch.Tensor]:
        if self.inputs is None:
            self.inputs = (torch.empty_like(images), torch.empty_like(labels), images.new_zeros((), dtype=torch.float))
        static_images, static_labels, static_progress = self.inputs
        if images.shape != static_images.shape or labels.shape != static_labels.shape:
            raise ValueError(
                f"cuda_graph needs batches of one shape: captured {tuple(static_images.shape)}, "
                f"got {tuple(images.shape)}"
            )
        static_images.copy_(images)
        static_labels.copy_(labels)
        static_progress.fill_(progress)
        if self.warmup_left > 0:
            self.warmup_left -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs = step(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            return outputs
        if self.graph is None or key != self.key:
            # The previous graph and its outputs go first, so its memory pool is free for the new capture.
            self.graph, self.outputs = None, {}
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.outputs = step(*self.inputs)
            self.graph, self.key = graph, key
        self.graph.replay()
        return self.outputs

"""Data-parallel training with PyTorch's own engine: torchrun, torch.distributed, DistributedDataParallel.

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in the environment) every process joins one process
group: NCCL on GPUs, gloo on CPUs. The rules the rest of the code relies on:

- The global batch of each step is the same whatever the world size: rank r takes every world-th sample of it
  (the order ``DistributedSampler`` produces). So one distributed step equals one single-process step on the
  concatenated batch, and a run can resume with another world size.
- Losses that look across the batch get the whole batch through ``gather_with_grad`` (an all-gather whose
  backward sends each rank the gradient of its own samples); per-sample losses stay local. A contrastive loss
  whose anchors are each rank's own samples gets the batch through ``gather_local_grad`` instead: the other
  ranks' rows are constants there, so each rank pushes only its local batch.
- Batch norm statistics: PyTorch's SyncBatchNorm on GPUs; on CPUs, where SyncBatchNorm refuses to run,
  ``AllReduceBatchNorm`` computes the same global statistics with autograd-aware all-reduces.
- Rank 0 alone logs, writes files and reports; the others wait at barriers.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place in the job; a single process is rank 0 of a world of 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def current_world() -> World:
    """The running process group's world (initialised by ``init_from_environment``), else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return World()


def init_from_environment() -> World:
    """Join the process group torchrun describes in the environment (no-op outside torchrun).

    NCCL where there are GPUs, gloo otherwise; each process takes the GPU of its local rank.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return current_world()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return current_world()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means for this process: ``auto`` is a GPU when there is one, and under torchrun
    ``cuda`` is the GPU of this process's local rank (training and evaluation alike)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    world = current_world()
    if device.type == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return device


def gather_with_grad(x: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's ``x`` concatenated in rank-interleaved sample order (as the global batch was dealt out).

    The backward pass gives each rank the summed gradient of its own rows over all ranks' losses; with every
    rank computing the same loss on the gathered batch and DDP averaging parameter gradients, the result is the
    single-process gradient.
    """
    if not world.distributed:
        return x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of a private module; still supported
        parts = dist_fn.all_gather(x.contiguous())
    return torch.stack(parts, dim=1).reshape(-1, *x.shape[1:])


def gather_local_grad(x: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's ``x`` in the order of ``gather_with_grad``, where only this rank's own rows carry gradient.

    The other ranks' rows are received without autograd, as a contrastive loss over a cross-rank pool of negatives
    is run: each rank's loss moves its own embeddings only, and no gradient is exchanged between ranks.
    """
    if not world.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(world.size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[world.rank] = x
    return torch.stack(parts, dim=1).reshape(-1, *x.shape[1:])


def local_positions(rows: int, world: World, device: torch.device | None = None) -> torch.Tensor:
    """Where this rank's ``rows`` samples lie in a batch gathered from every rank (rank-interleaved order)."""
    return torch.arange(world.rank, rows * world.size, world.size, device=device)


def gather_rows(x: torch.Tensor, world: World, total: int | None = None) -> torch.Tensor:
    """Without gradient: the rows each rank holds for ``range(rank, total, world)``, reassembled in order.

    That is a training batch dealt out by rank (every rank holds the same number of rows; ``total`` defaults to
    all of them) or an evaluation shard, whose last ranks may hold one row fewer (padded for the exchange).
    """
    if not world.distributed:
        return x
    total = x.shape[0] * world.size if total is None else total
    per_rank = -(-total // world.size)
    padded = torch.zeros((per_rank, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, dim=1).reshape(-1, *x.shape[1:])[:total]


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch on CPUs: sums and squared sums are all-reduced with autograd.

    Same parameters and buffers as BatchNorm1d/2d (so checkpoints load either way); in eval mode, or outside a
    process group, it is plain batch norm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        world = current_world()
        if not (self.training and world.distributed):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        count = torch.tensor([input.numel() / input.shape[1]], dtype=input.dtype, device=input.device)
        stats = torch.cat([input.sum(dims), (input * input).sum(dims), count])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            stats = dist_fn.all_reduce(stats)
        channels = input.shape[1]
        total = stats[-1]
        mean = stats[:channels] / total
        var = stats[channels : 2 * channels] / total - mean * mean
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                unbiased = var * total / (total - 1).clamp(min=1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased.detach(), momentum)
        shape = [1, channels, *([1] * (input.dim() - 2))]
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Batch norm layers whose statistics span all ranks: SyncBatchNorm on GPUs, AllReduceBatchNorm on CPUs."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        replaced = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats)  # fmt: skip
        replaced.load_state_dict(module.state_dict())
        replaced.train(module.training)
        return replaced
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child))
    return module

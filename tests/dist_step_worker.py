"""One training step of AdvBCT or Hot-refresh, single-process or as one rank of a gloo job (used by
test_distributed.py): the loss and every parameter gradient after DistributedDataParallel's all-reduce."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from advbct.compat import CompatContext, compute_class_statistics, create
from advbct.distributed import convert_batchnorm, current_world, gather_rows
from advbct.models.embedding import EmbeddingModel
from advbct.training.loop import TrainStep

GLOBAL_BATCH, CLASSES, DIM = 8, 4, 16


def build(method_name: str):
    torch.manual_seed(0)
    arch = {"backbone_kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16]}, "small_input": True}
    model = EmbeddingModel("resnet18", DIM, CLASSES, **arch)
    old = EmbeddingModel("resnet18", DIM, CLASSES, **arch).eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=gen)
    labels = torch.arange(GLOBAL_BATCH) % CLASSES
    stats_emb = torch.randn(32, DIM, generator=gen)
    stats = compute_class_statistics(stats_emb, torch.arange(32) % CLASSES, CLASSES, "old-id", tuple("abcd"))
    method = create(method_name, CompatContext(DIM, CLASSES, stats))
    with torch.no_grad():
        old_emb = old(images)
    return model, method, images, labels, old_emb


def step(method_name: str) -> dict[str, torch.Tensor]:
    world = current_world()
    model, method, images, labels, old_emb = build(method_name)
    if world.distributed:
        model = convert_batchnorm(model, torch.device("cpu"))
    mine = slice(world.rank, None, world.size)
    module = TrainStep(model, method, pass_classifier=True)
    if world.distributed:
        module = DistributedDataParallel(module)
    cls_loss, out = module(images[mine], labels[mine], labels[mine], old_emb[mine], 0.5, 1, 3, world.distributed)
    loss = cls_loss + out.total
    loss.backward()
    mean_loss = loss.detach().clone()
    if world.distributed:
        cls_mean = cls_loss.detach().clone()
        dist.all_reduce(cls_mean)
        mean_loss = cls_mean / world.size + out.total.detach()
        assert gather_rows(labels[mine], world).tolist() == labels.tolist()
    named = module.module.named_parameters() if world.distributed else module.named_parameters()
    grads = {name: p.grad.detach().clone() for name, p in named if p.grad is not None}
    return {"loss": mean_loss, **grads}


def main() -> None:
    method_name, out = sys.argv[1], sys.argv[2]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    result = step(method_name)
    if current_world().is_main:
        torch.save(result, out)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

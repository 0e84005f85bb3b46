"""One training step of AdvBCT or Hot-refresh, single-process or as one rank of a gloo job (used by
test_distributed.py): the loss and every parameter gradient after DistributedDataParallel's all-reduce.

``as-ranks`` computes in one process what a two-rank Hot-refresh step should: each rank's loss over its own anchors
with the other rank's embeddings as constants, averaged over the ranks. ``embeddings`` runs Hot-refresh's loss alone
on fixed embeddings and reports the gradient each rank's own rows receive (with ``gather_local_grad`` and, for
contrast, ``gather_with_grad``)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from advbct.compat import CompatBatch, CompatContext, compute_class_statistics, create
from advbct.distributed import (
    World,
    convert_batchnorm,
    current_world,
    gather_local_grad,
    gather_rows,
    gather_with_grad,
    local_positions,
)
from advbct.models.embedding import EmbeddingModel
from advbct.training.step import TrainStep

GLOBAL_BATCH, CLASSES, DIM = 8, 4, 16
RANKS = 2  # the world size the single-process references stand for


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
        dist.all_reduce(mean_loss)
        mean_loss /= world.size
        assert gather_rows(labels[mine], world).tolist() == labels.tolist()
    named = module.module.named_parameters() if world.distributed else module.named_parameters()
    grads = {name: p.grad.detach().clone() for name, p in named if p.grad is not None}
    return {"loss": mean_loss, **grads}


def _constant_except(emb: torch.Tensor, rank: int) -> torch.Tensor:
    """``emb`` with the rows of every rank but ``rank`` (rank-interleaved) detached."""
    mine = (torch.arange(emb.shape[0]) % RANKS == rank).unsqueeze(1)
    return torch.where(mine, emb, emb.detach())


def step_as_ranks(method_name: str) -> dict[str, torch.Tensor]:
    """The two-rank step of a local-anchor method in one process: the model runs on the whole batch (as the
    all-reduced batch norm does), and the method's loss is the mean over ranks of each rank's own-anchor loss."""
    model, method, images, labels, old_emb = build(method_name)
    module = TrainStep(model, method, pass_classifier=True)
    new_emb = module.model(images).float()
    cls_loss = F.cross_entropy(module.model.classify(new_emb, labels).float(), labels)
    per_rank = [
        method(CompatBatch(_constant_except(new_emb, r), labels, old_emb, 0.5, 1, 3, model.head.weight,
                           local_positions(GLOBAL_BATCH // RANKS, _rank(r)))).total
        for r in range(RANKS)
    ]  # fmt: skip
    loss = cls_loss + torch.stack(per_rank).mean()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), **grads}


def _rank(r: int) -> World:
    return World(rank=r, size=RANKS)


def embedding_grads() -> dict[str, torch.Tensor]:
    """Hot-refresh's loss alone on fixed embeddings: the gradient of each rank's own rows, gathered on rank 0 in
    batch order; in one process, the reference where each rank's loss sees the other rank's rows as constants."""
    world = current_world()
    gen = torch.Generator().manual_seed(2)
    new_all, old_all = torch.randn(GLOBAL_BATCH, DIM, generator=gen), torch.randn(GLOBAL_BATCH, DIM, generator=gen)
    labels = torch.arange(GLOBAL_BATCH) % CLASSES
    method = create("hot-refresh", CompatContext(DIM, CLASSES), temperature=0.5, top_k_negatives=2)
    if not world.distributed:
        new = new_all.clone().requires_grad_(True)
        for r in range(RANKS):
            rows = local_positions(GLOBAL_BATCH // RANKS, _rank(r))
            method(CompatBatch(_constant_except(new, r), labels, old_all, 0.5, 1, 3, None, rows)).total.backward()
        return {"local": new.grad}
    mine = slice(world.rank, None, world.size)
    result = {}
    for name, gather in (("local", gather_local_grad), ("shared", gather_with_grad)):
        new = new_all[mine].clone().requires_grad_(True)
        batch = CompatBatch(gather(new, world), labels, old_all, 0.5, 1, 3, None, local_positions(new.shape[0], world))
        method(batch).total.backward()
        result[name] = gather_rows(new.grad, world)
    return result


def main() -> None:
    method_name, out = sys.argv[1], sys.argv[2]
    mode = sys.argv[3] if len(sys.argv) > 3 else "step"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    if mode == "embeddings":
        result = embedding_grads()
    elif mode == "as-ranks":
        result = step_as_ranks(method_name)
    else:
        result = step(method_name)
    if current_world().is_main:
        torch.save(result, out)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

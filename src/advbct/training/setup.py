"""What a run trains and against what: the request checks, the model's metadata, and the parts built from them
(the model, the compatibility method, the frozen old network, the optimizer).

Every draw of initial weights comes from the process's global generator, seeded once with the run's seed right
before the model is built; the data order and augmentation have generators of their own (``BatchStream``), so the
same seed gives the same weights whatever else the process did before.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from advbct.compat import ClassStatistics, CompatContext, create, method_info, reference_method
from advbct.config import ModelConfig, TrainConfig
from advbct.data.allocation import Allocation
from advbct.data.batches import Preprocessing, normalise
from advbct.data.images import ImageSet
from advbct.distributed import convert_batchnorm
from advbct.models.checkpoint import OLD_MODEL_METHOD, CheckpointError, ModelMeta, build_model
from advbct.models.embedding import EmbeddingModel
from advbct.models.preprocessing import training_preprocessing
from advbct.training.cuda_graph import check_cuda_graph_setup

Role = Literal["old", "new"]

# The architecture fields that decide the shapes of the weights an old checkpoint hands to a new model.
WEIGHT_SHAPING_FIELDS = (
    "backbone",
    "backbone_kwargs",
    "small_input",
    "small_input_pool",
    "small_input_stride",
    "embedding_dim",
)
WHITENING_SAMPLE = 2000


@dataclass(frozen=True)
class OldModel:
    """The frozen model a new model must stay compatible with."""

    model: EmbeddingModel
    meta: ModelMeta
    path: Path


@dataclass
class TrainingParts:
    """What one run's steps update and read: the model and the method train, the old network only embeds."""

    model: EmbeddingModel
    method: nn.Module
    old_net: EmbeddingModel | None
    optimizer: torch.optim.SGD


def check_request(
    cfg: TrainConfig,
    role: Role,
    old: OldModel | None,
    stats: ClassStatistics | None,
    classes: tuple,
    device: torch.device,
    distributed: bool,
) -> None:
    """Refuse a run that cannot work, before any model is built."""
    if role == "new" and old is None and method_info(cfg.compat.method).needs_old_model:
        raise CheckpointError(f"method {cfg.compat.method!r} needs an old checkpoint (--old)")
    if cfg.init_from_old and (role != "new" or old is None):
        raise CheckpointError("init_from_old needs a new-model run with an old checkpoint (--old)")
    if old is not None:
        check_compatible_setup(cfg, old, stats, classes)
    if cfg.cuda_graph:
        check_cuda_graph_setup(device, distributed, cfg.compile)


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


def training_indices(role: Role, allocation: Allocation) -> torch.Tensor:
    """The training images a role sees: the old model only the old part of the allocation."""
    return allocation.old_indices if role == "old" else allocation.new_indices


def model_meta(
    cfg: TrainConfig, role: Role, train_set: ImageSet, allocation: Allocation, old: OldModel | None
) -> ModelMeta:
    """The metadata the finished checkpoint carries; an old model's head covers only the old classes."""
    return ModelMeta(
        architecture=cfg.model,
        data=cfg.data,
        preprocessing=_preprocessing(cfg, train_set, training_indices(role, allocation), old).to_json(),
        class_names=list(train_set.classes),
        head_classes=list(allocation.old_classes) if role == "old" else list(range(train_set.num_classes)),
        allocation=allocation.summary(),
        generation=1 if old is None else old.meta.generation + 1,
        method=OLD_MODEL_METHOD if role == "old" else cfg.compat.method,
        compatible_with=None if old is None else {"model_id": old.meta.model_id, "path": str(old.path)},
    )


def _preprocessing(cfg: TrainConfig, train_set: ImageSet, indices: torch.Tensor, old: OldModel | None) -> Preprocessing:
    """The transform a model is trained and evaluated with; a model fine-tuned from the old one keeps the inputs
    the old weights were trained on."""
    if cfg.init_from_old and old is not None:
        return old.meta.prep
    return training_preprocessing(cfg.model, cfg.data, train_set.images[indices])


def build_parts(
    cfg: TrainConfig,
    meta: ModelMeta,
    train_images: torch.Tensor,
    old: OldModel | None,
    stats: ClassStatistics | None,
    device: torch.device,
    resuming: bool,
    distributed: bool,
) -> TrainingParts:
    """Seed, draw the initial weights (model, then the method's own parameters), and put everything in the form
    the run's options ask for. ``resuming`` skips the stem whitening its saved weights replace anyway."""
    torch.manual_seed(cfg.seed)
    model = build_model(meta).to(device)
    if cfg.init_from_old:
        start_from_old(model, cfg.model, old)
    elif cfg.model.whitened_stem and not resuming:
        model.whiten_stem(whitening_sample(train_images, meta.prep, cfg.seed).to(device))
    method = build_method(cfg, meta.role, len(meta.class_names), old, stats).to(device)
    needs_old = meta.role == "new" and method.needs_old_embeddings
    old_net = old.model.to(device).eval().requires_grad_(False) if (old is not None and needs_old) else None
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        old_net = old_net.to(memory_format=torch.channels_last) if old_net is not None else None
    if distributed and cfg.sync_batchnorm:
        model = convert_batchnorm(model, device)
    if cfg.compile:
        # In place: the parameters and state-dict keys stay those of the plain module, so checkpoints and resume
        # do not depend on the option.
        for module in (model, method, old_net):
            if module is not None:
                module.compile()
    return TrainingParts(model, method, old_net, build_optimizer(cfg, model, method))


def build_optimizer(cfg: TrainConfig, model: nn.Module, method: nn.Module) -> torch.optim.SGD:
    """SGD over every trainable parameter of the model and the method; fused where a captured step needs it."""
    params = [p for p in [*model.parameters(), *method.parameters()] if p.requires_grad]
    return torch.optim.SGD(
        params,
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        fused=True if cfg.cuda_graph else None,
    )


def build_method(
    cfg: TrainConfig, role: str, num_classes: int, old: OldModel | None, stats: ClassStatistics | None
) -> nn.Module:
    """The compatibility method of a new model; an old model trains with none (``independent``)."""
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


def whitening_sample(images_u8: torch.Tensor, prep: Preprocessing, seed: int) -> torch.Tensor:
    """A seeded sample of at most WHITENING_SAMPLE training images, normalised, to set a whitened stem from:
    the patch covariance of 2,000 images is already stable, and every process of a run draws the same ones."""
    count = min(WHITENING_SAMPLE, images_u8.shape[0])
    chosen = torch.randperm(images_u8.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return normalise(images_u8[chosen], prep)


def head_label_map(head_classes: list[int], num_classes: int) -> torch.Tensor:
    """Dataset label -> row of the classifier head (-1 for classes the head does not cover)."""
    mapping = torch.full((num_classes,), -1, dtype=torch.long)
    mapping[torch.as_tensor(head_classes, dtype=torch.long)] = torch.arange(len(head_classes))
    return mapping

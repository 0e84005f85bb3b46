"""The compatibility-loss interface and its registry.

A method is an ``nn.Module`` (it may own parameters: AdvBCT's radii and discriminator) built from a
``CompatContext`` (what the training run knows: embedding dim, class count, old statistics, old classifier) plus
method options. Requirements are declared on the class and checked in ``create`` before any training starts,
so a method that cannot run is refused up front. Losses never move tensors between devices or call
distributed primitives; the training loop owns both.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from advbct.compat.statistics import ClassStatistics
from advbct.errors import AdvbctError


class CompatError(AdvbctError):
    """A compatibility method is unknown, misconfigured, or its requirements are not met."""


@dataclass(frozen=True)
class CompatContext:
    """What a training run can offer a method. Absent items are None."""

    embedding_dim: int
    num_classes: int
    statistics: ClassStatistics | None = None
    old_head: nn.Module | None = None
    old_head_classes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class CompatBatch:
    """One step's inputs: raw new embeddings, labels (global class ids), old embeddings of the same images,
    training progress (the fraction of steps done) and the epoch index (both 0-d device tensors on the CUDA-graph
    path, so they can change between replays of one captured step), and the new model's classifier weights (rows
    in global class order).

    ``local_rows``: for a method with ``local_anchors`` under data parallelism, the positions of this rank's own
    samples in the gathered batch; None means every row is this process's own (a single process).
    """

    new_emb: torch.Tensor
    labels: torch.Tensor
    old_emb: torch.Tensor | None
    progress: float | torch.Tensor
    epoch: int | torch.Tensor
    num_epochs: int
    new_classifier: torch.Tensor | None = None
    local_rows: torch.Tensor | None = None


@dataclass
class LossOutput:
    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class CompatibilityMethod(nn.Module):
    """Base class: subclasses set ``requires`` and implement ``forward(batch) -> LossOutput``.

    ``batch_wide``: the loss is not a plain mean of per-sample terms over the batch (it normalises by a count
    that depends on the batch, compares samples with each other, or runs batch norm), so distributed training
    hands it the batch gathered from every rank. Per-sample losses leave it False and stay local.

    ``needs_old_embeddings``: the loss reads the old model's embeddings of the batch, so training runs the old
    model's forward pass on every step. A method may decide it per instance from its options (AdvBCT without its
    adversarial term reads none), which is why training asks the built method rather than its class.

    ``local_anchors`` (with ``batch_wide``): the loss is taken over this rank's own samples only
    (``CompatBatch.local_rows``) and the rows gathered from other ranks arrive without gradient, so each rank pushes
    only its local batch: how contrastive losses with a cross-rank pool of negatives are run (Hot-refresh).

    ``fixed_options``: options of a parent class that a subclass sets itself (an ablation switching a part off);
    they are not options of the subclass.
    """

    requires: ClassVar[tuple[str, ...]] = ()
    needs_old_embeddings: bool = True
    batch_wide: ClassVar[bool] = False
    local_anchors: ClassVar[bool] = False
    fixed_options: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The options the constructor takes after the context, following ``**options`` up to the parent class
        that names them, less ``fixed_options``: what a configuration may set for this method."""
        names: list[str] = []
        for klass in cls.__mro__:
            if klass is CompatibilityMethod:
                break
            if "__init__" not in vars(klass):
                continue
            params = list(inspect.signature(klass.__init__).parameters.values())[2:]  # self, context
            names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return tuple(name for name in dict.fromkeys(names) if name not in cls.fixed_options)

    def forward(self, batch: CompatBatch) -> LossOutput:
        raise NotImplementedError


_REGISTRY: dict[str, type[CompatibilityMethod]] = {}
_REQUIREMENT_HELP = {
    "statistics": "old-class statistics (run `advbct stats` on the old checkpoint and pass --stats)",
    "old_head": "the old model's classifier (an old checkpoint; its head is part of it)",
}


def register_method(name: str) -> Callable[[type[CompatibilityMethod]], type[CompatibilityMethod]]:
    def decorate(cls: type[CompatibilityMethod]) -> type[CompatibilityMethod]:
        if name in _REGISTRY:
            raise CompatError(f"compatibility method {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[CompatibilityMethod]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CompatError(f"unknown compatibility method {name!r}; available: {', '.join(list_methods())}") from None


def create(name: str, context: CompatContext | None = None, **options: object) -> CompatibilityMethod:
    """Build a registered method; refuse it with a clear message when the context lacks what it needs."""
    cls = method_class(name)
    if context is None:
        raise CompatError(f"method {name!r} needs a CompatContext (embedding_dim, num_classes, ...)")
    for need in cls.requires:
        if getattr(context, need) is None:
            raise CompatError(f"method {name!r} needs {_REQUIREMENT_HELP.get(need, need)}")
    accepted = cls.option_names()
    for option in options:
        if option not in accepted:
            raise CompatError(f"method {name!r} has no option {option!r}; its options: {', '.join(accepted) or 'none'}")
    try:
        return cls(context, **options)
    except TypeError as exc:
        raise CompatError(f"bad options for method {name!r}: {exc}") from exc

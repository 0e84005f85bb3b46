"""The compatibility-loss interface and its registry.

A method is an ``nn.Module`` (it may own parameters: AdvBCT's radii and discriminator) built from a
``CompatContext`` (what the training run knows: embedding dim, class count, old statistics, old classifier) plus
its options, an instance of the method's ``Options`` schema (a frozen dataclass with types, defaults and allowed
values). Each registered method also says what kind of method it is, so the commands that train a set of methods
ask the registry for them instead of keeping lists. Requirements and options are checked before any training
starts (options already when the configuration is loaded), so a method that cannot run is refused up front.
Losses never move tensors between devices or call distributed primitives; the training loop owns both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

import pydantic
import torch
from torch import nn

from advbct.compat.statistics import ClassStatistics
from advbct.errors import AdvbctError

MethodKind = Literal["reference", "proposed", "baseline", "ablation", "variant"]
"""reference: no compatibility term, the model every cross test is measured against (M(*,*), M(*,o));
proposed: the method this project reproduces (AdvBCT); baseline: a published method the paper compares against;
ablation: the proposed method with a part switched off or fixed; variant: the proposed method with a change that
is not in the paper."""

OPTIONS_CONFIG = pydantic.ConfigDict(extra="forbid")


def options_schema(cls: type) -> type:
    """Decorate a class of annotated fields with defaults as a method's options schema: a frozen dataclass whose
    values pydantic checks against the annotations (``Literal`` for a choice, ``Field(gt=0)`` for a range)."""
    return pydantic.dataclasses.dataclass(frozen=True, config=OPTIONS_CONFIG)(cls)


@options_schema
class NoOptions:
    """The schema of a method that takes no options."""


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
    """Base class: subclasses set ``Options`` and ``requires`` and implement ``__init__(context, options)`` and
    ``forward(batch) -> LossOutput``.

    ``Options``: the method's options schema (see :func:`options_schema`); a configuration may set its fields,
    less ``fixed_options``.

    ``requires``: the items of the ``CompatContext`` the method cannot run without.

    ``batch_wide``: the loss is not a plain mean of per-sample terms over the batch (it normalises by a count
    that depends on the batch, compares samples with each other, or runs batch norm), so distributed training
    hands it the batch gathered from every rank. Per-sample losses leave it False and stay local.

    ``needs_old_embeddings``: the loss reads the old model's embeddings of the batch, so training runs the old
    model's forward pass on every step. A method may decide it per instance from its options (AdvBCT without its
    adversarial term reads none), which is why training asks the built method rather than its class.

    ``local_anchors`` (with ``batch_wide``): the loss is taken over this rank's own samples only
    (``CompatBatch.local_rows``) and the rows gathered from other ranks arrive without gradient, so each rank pushes
    only its local batch: how contrastive losses with a cross-rank pool of negatives are run (Hot-refresh).

    ``fixed_options``: option values a subclass sets itself (an ablation switching a part off); they are not
    options of the subclass.
    """

    Options: ClassVar[type] = NoOptions
    requires: ClassVar[tuple[str, ...]] = ()
    needs_old_embeddings: bool = True
    batch_wide: ClassVar[bool] = False
    local_anchors: ClassVar[bool] = False
    fixed_options: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The options a configuration may set for this method."""
        return tuple(f.name for f in dataclasses.fields(cls.Options) if f.name not in cls.fixed_options)

    @classmethod
    def parse_options(cls, name: str, raw: Mapping[str, Any]) -> Any:
        """``raw`` (a configuration's ``compat.options``) checked against the schema, as an ``Options`` instance;
        a :class:`CompatError` naming the first unknown or invalid option otherwise."""
        accepted = cls.option_names()
        for option in raw:
            if option not in accepted:
                known = ", ".join(accepted) or "none"
                raise CompatError(f"method {name!r} has no option {option!r}; its options: {known}")
        try:
            return pydantic.TypeAdapter(cls.Options).validate_python({**raw, **cls.fixed_options})
        except pydantic.ValidationError as exc:
            errors = exc.errors()
            option = errors[0]["loc"][0]
            # An option of several types (a number or a keyword) fails once per type: name them all.
            reasons = " or ".join(error["msg"] for error in errors if error["loc"][0] == option)
            got = errors[0].get("input")
            raise CompatError(f"method {name!r} option {option}: {reasons}, got {got!r}") from None

    def forward(self, batch: CompatBatch) -> LossOutput:
        raise NotImplementedError


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its name, kind and class (requirements and options schema with it)."""

    name: str
    kind: MethodKind
    method: type[CompatibilityMethod]

    @property
    def needs_old_model(self) -> bool:
        """Training it needs an old checkpoint: for the old model's embeddings or for what is derived from the old
        model (statistics, classifier)."""
        return bool(self.method.requires) or self.method.needs_old_embeddings


_REGISTRY: dict[str, MethodInfo] = {}
_REQUIREMENT_HELP = {
    "statistics": "old-class statistics (run `advbct stats` on the old checkpoint and pass --stats)",
    "old_head": "the old model's classifier (an old checkpoint; its head is part of it)",
}


def register_method(name: str, kind: MethodKind) -> Callable[[type[CompatibilityMethod]], type[CompatibilityMethod]]:
    """Register the decorated class under ``name`` as a method of ``kind``; a second registration of a name, or a
    second reference method, is refused."""
    if kind not in get_args(MethodKind):
        raise CompatError(f"method {name!r}: kind must be one of {', '.join(get_args(MethodKind))}, got {kind!r}")

    def decorate(cls: type[CompatibilityMethod]) -> type[CompatibilityMethod]:
        if name in _REGISTRY:
            raise CompatError(f"compatibility method {name!r} is registered twice")
        if kind == "reference" and methods_of_kind("reference"):
            raise CompatError(f"method {name!r}: there is already a reference method, {reference_method()!r}")
        _REGISTRY[name] = MethodInfo(name, kind, cls)
        return cls

    return decorate


def list_methods() -> list[str]:
    """Every registered method's name, sorted."""
    return sorted(_REGISTRY)


def methods_of_kind(*kinds: MethodKind) -> list[str]:
    """The registered methods of the given kinds, in registration order (the order tables show them in)."""
    return [name for name, info in _REGISTRY.items() if info.kind in kinds]


def compared_methods() -> list[str]:
    """What a comparison trains by default: every baseline, the proposed method, then its variants (the table's
    last rows)."""
    return [*methods_of_kind("baseline"), *methods_of_kind("proposed"), *methods_of_kind("variant")]


def reference_method() -> str:
    """The method with no compatibility term: what an old model trains with, and the reference of cross tests."""
    (name,) = methods_of_kind("reference")
    return name


def method_info(name: str) -> MethodInfo:
    """The registered method ``name``; a one-line :class:`CompatError` listing the others where it is unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CompatError(f"unknown compatibility method {name!r}; available: {', '.join(list_methods())}") from None


def method_class(name: str) -> type[CompatibilityMethod]:
    """The class registered as ``name`` (refused as :func:`method_info` refuses)."""
    return method_info(name).method


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuse an unknown method, or options its schema does not accept, with a one-line :class:`CompatError`."""
    method_class(name).parse_options(name, options)


def resolved_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Every option ``name`` takes, at the value a run given ``options`` uses (defaults included): what a run folder
    records, so that a later change of a default cannot change unnoticed what a stored run was trained with."""
    cls = method_class(name)
    parsed = dataclasses.asdict(cls.parse_options(name, options))
    return {key: value for key, value in parsed.items() if key not in cls.fixed_options}


def create(name: str, context: CompatContext | None = None, **options: Any) -> CompatibilityMethod:
    """Build a registered method; refuse it with a clear message when the context lacks what it needs."""
    cls = method_class(name)
    if context is None:
        raise CompatError(f"method {name!r} needs a CompatContext (embedding_dim, num_classes, ...)")
    for need in cls.requires:
        if getattr(context, need) is None:
            raise CompatError(f"method {name!r} needs {_REQUIREMENT_HELP.get(need, need)}")
    return cls(context, cls.parse_options(name, options))

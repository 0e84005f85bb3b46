"""Typed run configuration: YAML files plus dotted command-line overrides.

Every section rejects unknown keys, so a typo in a config (``optim.lrr``) fails loudly instead of silently
running with a default. Presets ship inside the package (``advbct/configs/*.yaml``) so an installed wheel can
run ``advbct quickstart`` without the source tree.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from advbct.errors import AdvbctError

AllocationKind = Literal["extended-class", "extended-data"]
HeadKind = Literal["softmax", "arcface", "cosface"]
T = TypeVar("T", bound=BaseModel)


class ConfigError(AdvbctError):
    """A configuration file or override is malformed; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the images come from and how old and new training sets relate."""

    dataset: Literal["cifar100", "image-folder"] = "cifar100"
    root: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    image_size: int = Field(32, ge=8)
    allocation: AllocationKind = "extended-class"
    old_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    allocation_seed: int = 0
    validation_per_class: int = Field(
        0, ge=0, description="training images per class set aside as a labelled validation split no model trains on"
    )
    max_train_per_class: int | None = Field(None, ge=1)
    max_test_per_class: int | None = Field(None, ge=1)
    augment: bool = True


class ModelConfig(_Section):
    """Backbone (timm) -> Linear(no bias) -> BatchNorm1d embedding -> classifier head."""

    backbone: str = "resnet18"
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    small_input: bool = True
    small_input_pool: bool = False
    small_input_stride: Literal[1, 2] = Field(
        1, description="stride of the small-input stem conv; 2 halves the resolution there instead of by max-pool"
    )
    embedding_dim: int = Field(256, ge=2)
    whitened_stem: bool = Field(
        False,
        description="set the stem conv from the training images' patch whitening and freeze it (fast short runs)",
    )
    head: HeadKind = "softmax"
    head_scale: float = Field(30.0, gt=0.0)
    head_margin: float = Field(0.3, ge=0.0)
    pretrained: bool = False
    weights: str | None = None


class OptimConfig(_Section):
    """SGD with a multi-step schedule, as in the paper's protocol."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    milestones: list[int] = Field(default_factory=lambda: [5, 10, 20])
    gamma: float = Field(0.1, gt=0.0)
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="of the classification loss")


class CompatConfig(_Section):
    """Which compatibility method trains the new model, and its options (checked against the method's options
    schema here, so a misspelt or ill-typed option is refused before any work). They are kept as given here, so a
    comparison can pass each method the ones it takes; a run's ``config.json`` records every option of its method
    at the value the run uses (``advbct.training.run_folder``)."""

    method: str = "advbct"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _method_takes_options(self) -> CompatConfig:
        # Imported here: the methods import the checkpoint code, which imports this module.
        from advbct.compat import check_options

        check_options(self.method, self.options)
        return self


class TrainConfig(_Section):
    """One training run (old or new model)."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    compat: CompatConfig = Field(default_factory=CompatConfig)
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    log_every: int = Field(20, ge=1)
    eval_batch_size: int = Field(1024, ge=1)
    checkpoint_every: int = Field(0, ge=0, description="also save last.pt every N steps (0: once per epoch)")
    sync_batchnorm: bool = Field(True, description="under torchrun, batch norm statistics over all ranks")
    compile: bool = Field(
        False,
        description="torch.compile the new and old networks and the compatibility loss (first steps slower; the "
        "loss's few dozen small operations become a few fused kernels)",
    )
    cuda_graph: bool = Field(
        False,
        description="replay each training step from a CUDA graph (one launch instead of hundreds of kernels per "
        "step; one capture per run, with fused SGD); single-GPU runs only, not with compile",
    )
    init_from_old: bool = Field(
        False,
        description="start a new model from the old checkpoint's weights (fine-tuning the deployed model) instead "
        "of a fresh initialisation; the old classes' classifier rows are copied too",
    )


class LiveConfig(_Section):
    """The quickstart's live half: which new model is deployed on the gallery, and how its answers are checked."""

    candidate: str = Field(
        "method", description="the new model put live: 'method' (trained with new.compat.method) or 'independent'"
    )
    force: bool = Field(False, description="deploy the candidate even when the gate refuses it (numbers recorded)")
    backfill_seed: int = Field(0, description="seed of the random order in which the gallery is re-embedded")
    probe_queries: int = Field(100, ge=1, description="test images whose live answers are checked")
    check_fractions: list[float] = Field(
        default_factory=lambda: [0.0, 0.5, 1.0], description="backfilled fractions at which the probe is checked"
    )

    @model_validator(mode="after")
    def _fractions_in_range(self) -> LiveConfig:
        if any(not 0.0 <= f <= 1.0 for f in self.check_fractions):
            raise ValueError(f"check_fractions must lie in [0, 1], got {self.check_fractions}")
        if self.candidate not in ("method", "independent"):
            raise ValueError(f"candidate must be 'method' or 'independent', got {self.candidate!r}")
        return self


class QuickstartConfig(_Section):
    """The whole upgrade path: old -> stats -> AdvBCT new -> independent new -> eval, and the live upgrade."""

    old: TrainConfig
    new: TrainConfig
    live: LiveConfig = Field(default_factory=LiveConfig)
    jobs: int = Field(1, ge=1, description="new models trained at once, each in a process of its own")

    @model_validator(mode="after")
    def _same_data(self) -> QuickstartConfig:
        if self.old.data != self.new.data:
            raise ValueError("old.data and new.data must be identical (both models share one allocation)")
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars/lists (``[5,10]``, ``true``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        _set_dotted(tree, key.strip(), value)
    return tree


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
    return tree


def preset_tree(name: str) -> dict[str, Any]:
    """The YAML tree of a preset shipped in the package (``advbct/configs/<name>.yaml``)."""
    resource = resources.files("advbct") / "configs" / f"{name}.yaml"
    if not resource.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return yaml.safe_load(resource.read_text()) or {}


def list_presets() -> list[str]:
    folder = resources.files("advbct") / "configs"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def build(cls: type[T], tree: dict[str, Any], source: str) -> T:
    """Validate ``tree`` as ``cls``; errors name the offending dotted key and where the tree came from."""
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {_message(err)}" for err in exc.errors()]
        raise ConfigError(f"invalid config ({source}): " + "; ".join(problems)) from None


def _message(error: Any) -> str:
    """pydantic's message for one error, without the "Value error, " it puts before a validator's own message."""
    return str(error["msg"]).removeprefix("Value error, ")


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    preset: str | None = None,
) -> T:
    """Preset (optional) <- YAML file (optional, deep-merged) <- dotted overrides."""
    tree: dict[str, Any] = preset_tree(preset) if preset else {}
    source = f"preset {preset}" if preset else "defaults"
    if path is not None:
        tree = deep_merge(tree, read_yaml(path))
        source = str(path)
    tree = apply_overrides(tree, list(overrides or []))
    return build(cls, tree, source)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out

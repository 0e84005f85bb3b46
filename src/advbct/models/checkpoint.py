"""Checkpoints: weights plus the metadata every later step needs to trust them.

The metadata travels as a JSON string inside the file so ``torch.load(weights_only=True)`` can read it: a
checkpoint from an untrusted source is parsed, never executed. ``model_id`` is a fresh random id per trained
model; statistics files and new models name the old model by it, so a mix-up between checkpoints is caught
instead of producing a silently incompatible model.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from advbct.config import DataConfig, ModelConfig
from advbct.data.batches import Preprocessing
from advbct.errors import AdvbctError
from advbct.models.embedding import EmbeddingModel

FORMAT_VERSION = 2
# What an old model's metadata names as its method: it trains by classification alone, against no older model.
OLD_MODEL_METHOD = "classification"
# Keys of format 1 that repeat what other keys hold (the embedding dim is the architecture's, the role follows from
# the method) or that never varied (every embedding was normalised): dropped when an older checkpoint is read.
LEGACY_KEYS = ("embedding_dim", "normalised_embedding", "role")


class CheckpointError(AdvbctError):
    """A checkpoint is missing, unreadable, or does not fit what it is used with."""


class ModelMeta(BaseModel):
    """Everything needed to rebuild, feed and trust a checkpoint without the run that made it: the architecture,
    the preprocessing (the whole evaluation transform, see ``Preprocessing``), which classes its head covers, the
    allocation it trained on, and the old model it claims to be compatible with (``method`` is ``classification``
    for an old model). Unknown fields are refused, so a checkpoint from a newer advbct is not half-read."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    model_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    architecture: ModelConfig
    data: DataConfig
    preprocessing: dict[str, Any]
    class_names: list[str]
    head_classes: list[int]
    allocation: dict[str, Any]
    generation: int
    method: str
    compatible_with: dict[str, Any] | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _drop_legacy_keys(cls, tree: Any) -> Any:
        """An older checkpoint's metadata read as the current format (saved again, it is written as one)."""
        if isinstance(tree, dict) and tree.get("format_version", FORMAT_VERSION) < FORMAT_VERSION:
            tree = {key: value for key, value in tree.items() if key not in LEGACY_KEYS}
            tree["format_version"] = FORMAT_VERSION
        return tree

    @field_validator("preprocessing")
    @classmethod
    def _readable_preprocessing(cls, tree: dict[str, Any]) -> dict[str, Any]:
        """Refuse a transform evaluation could not apply when the checkpoint is read, not when it is used."""
        try:
            Preprocessing.from_json(tree)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"preprocessing {tree}: {exc}") from None
        return tree

    @property
    def embedding_dim(self) -> int:
        return self.architecture.embedding_dim

    @property
    def role(self) -> str:
        """``old`` for a model trained by classification alone, ``new`` for one trained against an old model."""
        return "old" if self.method == OLD_MODEL_METHOD else "new"

    @property
    def prep(self) -> Preprocessing:
        return Preprocessing.from_json(self.preprocessing)


def build_model(meta: ModelMeta, load_pretrained: bool = True) -> EmbeddingModel:
    """The untrained network ``meta`` describes. ``load_pretrained=False`` skips downloading or reading backbone
    weights where a checkpoint's own weights replace them anyway."""
    arch = meta.architecture
    return EmbeddingModel(
        backbone=arch.backbone,
        embedding_dim=arch.embedding_dim,
        num_classes=len(meta.head_classes),
        head=arch.head,
        head_scale=arch.head_scale,
        head_margin=arch.head_margin,
        small_input=arch.small_input,
        small_input_pool=arch.small_input_pool,
        small_input_stride=arch.small_input_stride,
        backbone_kwargs=arch.backbone_kwargs,
        pretrained=arch.pretrained and load_pretrained,
        weights=arch.weights if load_pretrained else None,
        whitened_stem=arch.whitened_stem,
    )


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file and rename, so a crash never leaves a half-written checkpoint. The temporary name
    is unique to the writing process and thread, so two writers of one path never share a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def save_checkpoint(path: Path, model: torch.nn.Module, meta: ModelMeta, **extra: Any) -> None:
    atomic_save({"meta": meta.model_dump_json(), "model": model.state_dict(), **extra}, Path(path))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw entries of a checkpoint file (a resumable ``last.pt`` holds more than weights and metadata); every
    failure is a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(blob, dict) or "meta" not in blob or "model" not in blob:
        raise CheckpointError(f"{path} is not an advbct checkpoint (no meta/model entries)")
    return blob


def read_meta(blob: dict[str, Any], path: str | Path) -> ModelMeta:
    """The validated metadata of a checkpoint read by ``read_checkpoint``; a newer format is refused."""
    try:
        meta = ModelMeta.model_validate(json.loads(blob["meta"]))
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable metadata: {exc}") from exc
    if meta.format_version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {meta.format_version} is newer than this advbct understands")
    return meta


def load_checkpoint(path: str | Path) -> tuple[EmbeddingModel, ModelMeta]:
    """The model (eval mode, on CPU) and its metadata."""
    blob = read_checkpoint(path)
    meta = read_meta(blob, path)
    model = build_model(meta, load_pretrained=False)
    try:
        model.load_state_dict(blob["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the architecture in its metadata: {exc}") from exc
    return model.eval(), meta


def load_comparable_checkpoints(paths: dict[str, Path]) -> dict[str, tuple[EmbeddingModel, ModelMeta]]:
    """Several checkpoints for cross tests, loaded once each; they must share one embedding dimension."""
    models = {name: load_checkpoint(path) for name, path in paths.items()}
    dims = {name: meta.embedding_dim for name, (_, meta) in models.items()}
    if len(set(dims.values())) > 1:
        raise CheckpointError(f"models embed to different dimensions {dims}; cross tests need one dimension")
    return models

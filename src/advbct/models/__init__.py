"""Embedding models, classifier heads and checkpoints with metadata."""

from advbct.models.checkpoint import (
    CheckpointError,
    ModelMeta,
    build_model,
    load_checkpoint,
    read_checkpoint,
    read_meta,
    save_checkpoint,
)
from advbct.models.embedding import EmbeddingModel
from advbct.models.heads import CosineMarginHead, SoftmaxHead, make_head

__all__ = [
    "CheckpointError",
    "CosineMarginHead",
    "EmbeddingModel",
    "ModelMeta",
    "SoftmaxHead",
    "build_model",
    "load_checkpoint",
    "make_head",
    "read_checkpoint",
    "read_meta",
    "save_checkpoint",
]

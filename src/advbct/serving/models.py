"""Query models and the compatibility gate.

A new generation goes live only if, on a labelled validation image folder, its queries
find the current gallery better than the current model does (M(n,o) > M(o,o)) and it is better on its own
(M(n,n) > M(o,o)), with the same embedding dimension; otherwise it is refused with the measured numbers and the
registry is left untouched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from advbct.data.batches import Preprocessing
from advbct.data.images import ImageSet
from advbct.evaluation.backfill import fit_calibration
from advbct.evaluation.protocol import embed_files, embed_images, evaluate_pairs, ready_for_inference
from advbct.models.checkpoint import load_checkpoint


class GateRefused(ValueError):
    """The candidate model failed the compatibility gate; the message holds the numbers."""


class Embedder:
    """A checkpoint ready to embed decoded images or image files at its own input size."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.path = Path(path)
        self.model, self.meta = load_checkpoint(self.path)
        self.device = torch.device(device)
        # In the form embed_images wants (channels_last), once, here: the search batcher and the backfill then share
        # a model that no call converts again while the other runs it.
        self.model = ready_for_inference(self.model, self.device, channels_last=True)

    @property
    def dim(self) -> int:
        return self.meta.embedding_dim

    @property
    def prep(self) -> Preprocessing:
        return self.meta.prep

    def embed_arrays(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) at the model's size -> L2-normalised float32 (N, d)."""
        batch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        return F.normalize(embed_images(self.model, batch, self.prep, self.device), dim=1).numpy()

    def embed_files(self, paths: list[Path]) -> np.ndarray:
        """Image files, centre-cropped like the training images -> L2-normalised float32 (N, d)."""
        emb = embed_files(self.model, self.prep, paths, self.device, whole=False)
        return F.normalize(emb, dim=1).numpy()


def compatibility_gate(old: Embedder, new: Embedder, validation: ImageSet) -> dict:
    """M(o,o), M(n,n), M(n,o) (mAP, percent) on the validation images and whether the upgrade is allowed."""
    if new.dim != old.dim:
        raise GateRefused(f"the candidate embeds to {new.dim} dimensions, the gallery holds {old.dim}")
    embeddings = {
        "old": embed_images(old.model, validation.images, old.prep, old.device),
        "new": embed_images(new.model, validation.images, new.prep, new.device),
    }
    tests = evaluate_pairs(embeddings, validation.labels, [("old", "old"), ("new", "new"), ("new", "old")])
    numbers: dict = {key: value["map"] for key, value in tests.items()}
    numbers["passed"] = numbers["new/old"] > numbers["old/old"] and numbers["new/new"] > numbers["old/old"]
    numbers["calibration"] = gallery_calibration(embeddings, validation.labels)
    return numbers


def gallery_calibration(embeddings: dict[str, torch.Tensor], labels: torch.Tensor) -> dict | None:
    """The score calibration searches use while the candidate's gallery is mixed, fitted on the gate's
    validation embeddings; none (plain cosine) where the split holds no pair of one class."""
    try:
        return fit_calibration(embeddings["new"], embeddings["new"], embeddings["old"], labels).to_json()
    except ValueError:
        return None


def describe_gate(numbers: dict) -> str:
    """The gate's decision in one line, with the numbers it was made on."""
    return (
        f"M(n,o) {numbers['new/old']:.2f}, M(n,n) {numbers['new/new']:.2f}, M(o,o) {numbers['old/old']:.2f} "
        "(both must exceed M(o,o))"
    )

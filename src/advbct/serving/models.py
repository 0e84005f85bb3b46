"""Model generations: checkpoints registered in order, one active query model, and the compatibility gate.

The registry is a small JSON file written atomically beside the gallery (the vectors live in Milvus; this file
only names checkpoints). A new generation goes live only if, on a labelled validation image folder, its queries
find the current gallery better than the current model does (M(n,o) > M(o,o)) and it is better on its own
(M(n,n) > M(o,o)), with the same embedding dimension; otherwise it is refused with the measured numbers and the
registry is left untouched.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from advbct.data.batches import Preprocessing
from advbct.data.images import ImageSet, load_image_folder
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


@dataclass(frozen=True)
class Generation:
    number: int
    path: str
    model_id: str
    dim: int
    image_size: int
    registered_at: float
    gate: dict | None


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
    return numbers


def describe_gate(numbers: dict) -> str:
    """The gate's decision in one line, with the numbers it was made on."""
    return (
        f"M(n,o) {numbers['new/old']:.2f}, M(n,n) {numbers['new/new']:.2f}, M(o,o) {numbers['old/old']:.2f} "
        "(both must exceed M(o,o))"
    )


class ModelRegistry:
    """Generations and the active one, in ``path`` (JSON)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.state = json.loads(self.path.read_text()) if self.path.is_file() else {"generations": [], "active": None}

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.replace(self.path)

    @property
    def generations(self) -> list[Generation]:
        return [Generation(**g) for g in self.state["generations"]]

    @property
    def active(self) -> Generation | None:
        number = self.state["active"]
        return next((g for g in self.generations if g.number == number), None)

    def generation(self, number: int) -> Generation:
        for g in self.generations:
            if g.number == number:
                return g
        raise GateRefused(f"no generation {number} is registered")

    def _append(self, embedder: Embedder, gate: dict | None) -> Generation:
        number = max((g.number for g in self.generations), default=0) + 1
        entry = Generation(number, str(embedder.path.resolve()), embedder.meta.model_id, embedder.dim,
                           embedder.prep.image_size, time.time(), gate)  # fmt: skip
        self.state["generations"].append(entry.__dict__)
        self.state["active"] = number
        self._save()
        return entry

    def register_first(self, path: str | Path, device: str = "cpu") -> Generation:
        if self.generations:
            raise GateRefused("the registry already has generations; use upgrade")
        return self._append(Embedder(path, device), None)

    def upgrade(
        self,
        path: str | Path,
        validation: str | Path | ImageSet,
        device: str = "cpu",
        force: bool = False,
    ) -> Generation:
        """Gate the candidate against the active generation; register it and make it active only if it passes.

        ``validation``: a labelled image folder, or images already decoded (a run's validation split).
        ``force`` is the operator's override: the gate still runs and its numbers are recorded with the generation.
        """
        numbers = self.check_gate(path, validation, device)
        if not numbers["passed"] and not force:
            where = validation if not isinstance(validation, ImageSet) else "the validation split"
            raise GateRefused(f"{path} fails the compatibility gate on {where}: {describe_gate(numbers)}")
        numbers["forced"] = force and not numbers["passed"]
        return self._append(Embedder(path, device), numbers)

    def check_gate(self, path: str | Path, validation: str | Path | ImageSet, device: str = "cpu") -> dict:
        """The gate's numbers for a candidate against the active generation; registers nothing."""
        current = self.active
        if current is None:
            raise GateRefused("no active generation to upgrade from; register the first model")
        candidate = Embedder(path, device)
        if candidate.meta.model_id in {g.model_id for g in self.generations}:
            raise GateRefused(f"{path} is already registered")
        old = Embedder(current.path, device)
        if not isinstance(validation, ImageSet):
            validation = load_image_folder(validation, old.prep.image_size)
        return compatibility_gate(old, candidate, validation)

    def reserve_ids(self, count: int) -> int:
        """The first of ``count`` fresh item ids; the counter is saved before any item is written."""
        start = int(self.state.get("next_id", 0))
        self.state["next_id"] = start + count
        self._save()
        return start

    def rollback(self) -> Generation:
        """Make the generation before the active one active again."""
        current = self.active
        earlier = [g for g in self.generations if current is not None and g.number < current.number]
        if not earlier:
            raise GateRefused("there is no earlier generation to roll back to")
        self.state["active"] = earlier[-1].number
        self._save()
        return earlier[-1]

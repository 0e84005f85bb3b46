"""Query models: a checkpoint ready to embed decoded images or image files, as the service, the backfill and the
compatibility gate use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from advbct.data.batches import Preprocessing
from advbct.evaluation.protocol import embed_files, embed_images, ready_for_inference
from advbct.models.checkpoint import load_checkpoint


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
        """Image files, framed as the checkpoint records -> L2-normalised float32 (N, d)."""
        emb = embed_files(self.model, self.prep, paths, self.device, whole=False)
        return F.normalize(emb, dim=1).numpy()

"""A run's folder: what it was made with, where an unfinished run resumes, and the finished model.

``config.json`` holds the run's configuration; a later call with another one is refused rather than mixing two
runs in one folder. ``last.pt`` (weights, method state, optimizer, position, history) is written atomically during
training, so a run resumes where it stopped; ``model.pt`` (weights and metadata only) marks the run finished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from advbct.compat import CompatError, resolved_options
from advbct.config import TrainConfig
from advbct.distributed import World
from advbct.models.checkpoint import (
    CheckpointError,
    ModelMeta,
    atomic_save,
    read_checkpoint,
    read_meta,
    save_checkpoint,
)
from advbct.models.embedding import EmbeddingModel
from advbct.training.setup import TrainingParts


@dataclass
class Position:
    """Where training stands: the next step to run is ``step`` of ``epoch``; ``history`` has one summary per
    finished epoch."""

    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)


def comparable_config(tree: dict) -> dict:
    """A run's config without what may legitimately differ between machines (data location, device) or between
    the sessions of one run (``cuda_graph`` changes how a step is launched, not what it computes)."""
    tree = json.loads(json.dumps(tree))
    tree.pop("device", None)
    tree.pop("cuda_graph", None)
    tree.pop("checkpoint_every", None)
    tree.get("data", {}).pop("root", None)
    return tree


def with_defaults(tree: dict) -> dict:
    """A saved config with the keys it lacks filled in at their defaults, which reproduce the behaviour it was saved
    with, so a folder is not refused for lacking options it never set."""
    try:
        return TrainConfig.model_validate(tree).model_dump(mode="json")
    except ValidationError:
        return tree


def with_resolved_options(tree: dict) -> dict:
    """A config tree whose ``compat.options`` hold every option of its method at the value the run uses. A folder
    saved with the options as given (or with an option its method no longer takes) is left as it is."""
    compat = tree.get("compat") or {}
    try:
        options = resolved_options(compat["method"], compat.get("options") or {})
    except (KeyError, CompatError):
        return tree
    return {**tree, "compat": {**compat, "options": options}}


def check_same_run(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to resume or reuse a run folder that was made with another configuration, compatibility options
    compared at the values each run uses."""
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        return
    saved = comparable_config(with_resolved_options(with_defaults(json.loads(saved_path.read_text()))))
    current = comparable_config(with_resolved_options(cfg.model_dump(mode="json")))
    if saved != current:
        differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        raise CheckpointError(
            f"run folder {run_dir} was made with a different config (sections {', '.join(differing)} differ); "
            "use another --out, or delete the folder to start again"
        )


class RunFolder:
    """The files of one run. Only the main process of a distributed run writes; every process waits until a
    checkpoint is complete."""

    def __init__(self, path: Path, world: World):
        self.path, self.world = Path(path), world
        self.final, self.last = self.path / "model.pt", self.path / "last.pt"

    @property
    def finished(self) -> bool:
        return self.final.is_file()

    @property
    def resumable(self) -> bool:
        return self.last.is_file()

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    def write_config(self, cfg: TrainConfig) -> None:
        if self.world.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            recorded = with_resolved_options(cfg.model_dump(mode="json"))
            (self.path / "config.json").write_text(json.dumps(recorded, indent=2))

    def resume(self, parts: TrainingParts) -> tuple[ModelMeta, Position]:
        """Load ``last.pt`` into ``parts``; the saved metadata (its model id included) and position."""
        blob = read_checkpoint(self.last)
        meta = read_meta(blob, self.last)
        parts.model.load_state_dict(blob["model"])
        parts.method.load_state_dict(blob["method"])
        parts.optimizer.load_state_dict(blob["optimizer"])
        epoch, step = int(blob["epoch"]), int(blob.get("step", 0))
        history = json.loads(blob.get("history", "[]")) if epoch or step else []
        return meta, Position(epoch, step, history)

    def save_state(self, parts: TrainingParts, meta: ModelMeta, position: Position) -> None:
        """``last.pt``, from which the run resumes at ``position``."""
        if self.world.is_main:
            state = {
                "model": parts.model.state_dict(),
                "method": parts.method.state_dict(),
                "optimizer": parts.optimizer.state_dict(),
            }
            extra = {"epoch": position.epoch, "step": position.step, "history": json.dumps(position.history)}
            atomic_save({"meta": meta.model_dump_json(), **state, **extra}, self.last)
        self.world.barrier()

    def finish(self, model: EmbeddingModel, meta: ModelMeta, history: list[dict]) -> Path:
        """``model.pt`` (plain CPU weights, the history in its metadata) and ``history.json``."""
        meta.metrics["train_history"] = history
        if self.world.is_main:
            save_checkpoint(self.final, model, meta)
            (self.path / "history.json").write_text(json.dumps(history, indent=2))
        self.world.barrier()
        return self.final

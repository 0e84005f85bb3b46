"""What a run shows while it trains: loss parts summed on the device, TensorBoard scalars, a progress bar, and
(in a worker process of a pool) one printed line per finished epoch.

Loss parts are read back only every ``log_every`` steps, so a GPU step never waits for the host.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from advbct.distributed import World

SUMMARY_PARTS = ("loss", "cls", "adv", "bound")


class LossMeter:
    """Sums of loss parts kept on the device; ``read`` syncs once and resets. A step's parts are stacked into one
    tensor and added at once: two kernel launches per step whatever the number of parts, rather than one per part
    for the host to pay."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None
        self.count = 0

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        # The stack is a new tensor, never a part itself: a CUDA graph's outputs are overwritten in place by the
        # next replay.
        values = torch.stack([value.detach().float() for value in parts.values()])
        if self.sums is None:
            self.names, self.sums = list(parts), values
        elif list(parts) != self.names:
            raise ValueError(f"loss parts changed within a run: {self.names} then {list(parts)}")
        else:
            self.sums = self.sums + values
        self.count += 1

    def read(self, world: World | None = None) -> dict[str, float]:
        """Means since the last read, averaged over ranks (one all-reduce) when training is distributed."""
        if self.sums is None:
            return {}
        values = self.sums / max(1, self.count)
        if world is not None and world.distributed:
            dist.all_reduce(values)
            values = values / world.size
        names, self.sums, self.count = self.names, None, 0
        return dict(sorted(zip(names, values.tolist(), strict=True)))


class _EpochLines:
    """Whether this process reports each finished epoch as one printed line: runs in processes of their own
    cannot share the parent's progress display, and a line per epoch still shows that they move."""

    enabled = False


def report_epochs_as_lines() -> None:
    """Called by a worker process of a training pool: from then on its runs print one line per finished epoch."""
    _EpochLines.enabled = True


def progress_display(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
    )


class TrainingLogger:
    """One run's progress bar and TensorBoard scalars; only the main process of a distributed run shows or writes
    anything. Use as a context manager: the bar is live and the TensorBoard file open inside the block."""

    def __init__(self, name: str, world: World, tensorboard: Path, show_progress: bool, epochs: int):
        self.name, self.world, self.epochs = name, world, epochs
        self.tensorboard = tensorboard if world.is_main else None
        self.display = progress_display(show_progress and world.is_main)
        self.writer = None

    def __enter__(self) -> TrainingLogger:
        if self.tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter  # pulls in tensorboard, which nothing else needs

            self.writer = SummaryWriter(str(self.tensorboard))
        self.display.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.display.__exit__(kind, error, trace)
        if self.writer is not None:
            self.writer.close()

    def start(self, total_steps: int, done: int) -> None:
        self.task = self.display.add_task(self.name, total=total_steps, completed=done, info="")

    def steps(self, values: dict[str, float], global_step: int, epoch: int, lr: float) -> None:
        """The mean loss parts of the steps since the last call, at ``global_step``."""
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, global_step)
            self.writer.add_scalar("train/lr", lr, global_step)
        info = " ".join(f"{k}={v:.3f}" for k, v in values.items())
        self.display.update(self.task, completed=global_step + 1, info=f"ep {epoch + 1}/{self.epochs} {info}")

    def epoch(self, summary: dict) -> None:
        """A finished epoch's summary (its mean loss parts, images/s and seconds)."""
        if _EpochLines.enabled and self.world.is_main:
            losses = " ".join(f"{k}={v:.3f}" for k, v in summary.items() if k in SUMMARY_PARTS)
            epoch, seconds = summary["epoch"], summary["seconds"]
            print(f"  {self.name}: epoch {epoch + 1}/{self.epochs} {losses} ({seconds:.0f} s)", flush=True)
        if self.writer is not None:
            self.writer.add_scalar("train/images_per_s", summary["images_per_s"], summary["epoch"])

"""Training several models at once: each in a spawned process of its own, the machine's cores shared between
them. One small model leaves most of a GPU idle, so a comparison or a table trains its models ``jobs`` at a time.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from advbct.training.logger import report_epochs_as_lines


def check_jobs(jobs: int) -> None:
    """Refuse a bad concurrency request before anything trains."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")


def set_threads(processes: int | None = None) -> None:
    """Share this command's cores between ``processes`` processes on this machine (by default those torchrun
    started). The cores are ``OMP_NUM_THREADS`` where the user set it, else all this process may run on
    (PyTorch's own default can be lower in containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    budget = os.environ.get("OMP_NUM_THREADS", "")
    cores = int(budget) if budget.isdigit() and int(budget) > 0 else cores
    local_processes = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (cores or 1) // max(1, local_processes)))


def _executor(workers: int, show_progress: bool) -> ProcessPoolExecutor:
    """Spawned processes (CUDA cannot be forked) that share the machine's cores; each seeds and draws from its own
    global random generator, so a run trains the same model as it would alone."""
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(workers, show_progress)
    )


def _start_worker(workers: int, show_progress: bool) -> None:
    """A training process of a pool: its share of the cores, and a printed line per epoch for progress."""
    set_threads(workers)
    if show_progress:
        report_epochs_as_lines()


@dataclass(frozen=True)
class Task:
    """One training to run concurrently: ``fn(*args, show_progress)`` (module-level, so a spawned process can
    unpickle it), named ``label`` in progress messages."""

    label: str
    fn: Callable[..., Path]
    args: tuple


def run_concurrently(what: str, tasks: list[Task], jobs: int, console: Console, show_progress: bool) -> list[Path]:
    """Run ``jobs`` tasks at a time, each in a process of its own; their results in the order given. A failed
    task's exception is raised here once the others finish or fail. The processes show no progress bars (they
    cannot share this process's display), only a line per finished epoch."""
    workers = min(jobs, len(tasks))
    labels = ", ".join(task.label for task in tasks)
    console.print(f"[bold]{what}:[/] {labels} ({workers} at a time, in processes)")
    paths: dict[int, Path] = {}
    with _executor(workers, show_progress) as pool:
        futures = {pool.submit(_run_task, task): i for i, task in enumerate(tasks)}
        for future in as_completed(futures):
            i = futures[future]
            paths[i] = future.result()
            console.print(f"  finished: {tasks[i].label} ({len(paths)}/{len(tasks)})")
    return [paths[i] for i in range(len(tasks))]


def _run_task(task: Task) -> Path:
    """``task`` in a worker process, without a progress bar (where progress is shown, the worker prints a line per
    epoch instead)."""
    return task.fn(*task.args, False)

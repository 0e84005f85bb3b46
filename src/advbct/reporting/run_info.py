"""What produced a run folder's results: the command line, the machine and the library versions, written beside
``results.json`` as ``run.json`` so that a table rendered later can say where its numbers came from."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

RUN_FILE = "run.json"


def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, the platform's word elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_info() -> dict:
    """The command as typed (``advbct ...``) and the hardware it ran on. No duration: a re-run that finds its
    models trained writes this file too, and its own time would say nothing about the numbers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "command": " ".join(["advbct", *sys.argv[1:]]),
        "machine": {"cpu": _cpu_name(), "cores": cores, "gpus": gpus},
        "torch": torch.__version__,
    }


def write_run_info(folder: Path) -> None:
    (folder / RUN_FILE).write_text(json.dumps(run_info(), indent=2))


def read_run_info(folder: Path) -> dict | None:
    path = folder / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None

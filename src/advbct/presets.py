"""Run configurations assembled from what a user gives: a built-in preset, an optional YAML file and dotted
overrides (``-o optim.lr=0.05``), in that order of precedence, plus the data root and device.

Presets and files come in two shapes: a single TrainConfig tree, or a quickstart tree (``common``, ``old``,
``new``) whose ``common`` section lies under each role. Both commands and scripts build their configs here, so
a preset means the same thing wherever it is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from advbct.config import (
    QuickstartConfig,
    TrainConfig,
    apply_overrides,
    build,
    deep_merge,
    preset_tree,
    read_yaml,
)


def location_overrides(data: str | None, device: str | None, prefix: str = "") -> list[str]:
    """Dotted overrides for the data root and the device given on the command line."""
    out = []
    if data is not None:
        out.append(f"{prefix}data.root={json.dumps(data)}")
    if device is not None:
        out.append(f"{prefix}device={device}")
    return out


def build_quickstart(
    tree: dict[str, Any], overrides: list[str], data: str | None, device: str | None, source: str
) -> QuickstartConfig:
    """A quickstart-shaped tree (common/old/new) with the data root, device and dotted overrides applied, its
    ``common`` section merged under each role."""
    tree = apply_overrides(tree, [*location_overrides(data, device, "common."), *overrides])
    common = tree.pop("common", {})
    for role in ("old", "new"):
        tree[role] = deep_merge(common, tree.get(role, {}))
    return build(QuickstartConfig, tree, source)


def _role_tree(preset_or_file: dict[str, Any], role: str) -> dict[str, Any]:
    """A quickstart-shaped tree (common/old/new) reduced to one role's TrainConfig tree."""
    if not {"common", "old", "new"} & preset_or_file.keys():
        return preset_or_file
    return deep_merge(preset_or_file.get("common", {}), preset_or_file.get(role, {}))


def _source(preset: str, config: Path | None) -> str:
    """Where a config came from, for error messages."""
    return f"preset {preset}" + (f" + {config}" if config else "")


def train_config(
    role: str,
    preset: str,
    config: Path | None,
    overrides: list[str] | None,
    data: str | None,
    device: str | None,
) -> TrainConfig:
    """One training run's config: the ``role`` ("old" or "new") part of the preset and of the YAML file, with
    the data root, device and overrides applied."""
    tree = _role_tree(preset_tree(preset), role)
    if config is not None:
        tree = deep_merge(tree, _role_tree(read_yaml(config), role))
    tree = apply_overrides(tree, [*location_overrides(data, device), *(overrides or [])])
    return build(TrainConfig, tree, _source(preset, config))


def quickstart_config(
    preset: str, config: Path | None, overrides: list[str] | None, data: str | None, device: str | None
) -> QuickstartConfig:
    """The whole upgrade path's config (old, new and live sections) from a preset and an optional YAML file,
    with the data root, device and overrides applied."""
    tree = preset_tree(preset)
    if config is not None:
        tree = deep_merge(tree, read_yaml(config))
    return build_quickstart(tree, list(overrides or []), data, device, _source(preset, config))

"""The backfill curve as a picture: mAP of the new query model while the gallery is re-embedded.

Drawn with matplotlib's Agg backend, so it works on machines without a display.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from advbct.evaluation.results import LiveUpgradeReport, UpgradeReport

LABELS = {"advbct": "AdvBCT", "advbct-tight": "AdvBCT-tight", "independent": "independent (no compatible training)"}


def _reference_lines(ax: plt.Axes, upgrade: UpgradeReport) -> None:
    old, new = upgrade.old.map, upgrade.self_test.map
    ax.axhline(old, color="grey", ls="--", lw=1, label=f"M(o,o) {old:.2f}")
    ax.axhline(new, color="tab:blue", ls=":", lw=1, label=f"M(n,n) {new:.2f}")


def _plot_curve(ax: plt.Axes, curve: dict, label: str, **style: object) -> None:
    xs = [100 * f for f in curve["fractions"]]
    ax.plot(xs, curve["map"], marker="o", ms=3, label=f"{label}, AUC {curve['auc_map']:.2f}", **style)


def _merges_panel(ax: plt.Axes, backfill: dict) -> None:
    """Both models in random order, raw cosine (solid) and calibrated merge (dashed), and the live checks."""
    for colour, (name, curves) in zip(("tab:blue", "tab:orange"), backfill["curves"].items(), strict=False):
        for merge, ls in (("raw", "-"), ("calibrated", "--")):
            if f"random/{merge}" in curves:
                _plot_curve(ax, curves[f"random/{merge}"], f"{LABELS.get(name, name)}, {merge}", color=colour, ls=ls)
    live = backfill.get("live")
    if live and live["points"]:
        xs = [100 * p["fraction"] for p in live["points"]]
        ax.scatter(xs, [p["map"] for p in live["points"]], marker="x", color="black", zorder=3,
                   label=f"live Milvus answers ({live['probe_queries']} probe queries)")  # fmt: skip
    ax.set_title("Random order: raw cosine vs calibrated merge")


def _orders_panel(ax: plt.Axes, backfill: dict, method: str) -> None:
    """The compatible model under every order policy, calibrated merge."""
    for key, curve in backfill["curves"].get(method, {}).items():
        if key.endswith("/calibrated"):
            _plot_curve(ax, curve, key.split("/")[0])
    ax.set_title(f"{LABELS.get(method, method)}, calibrated merge: which items first")


def backfill_figure(report: LiveUpgradeReport) -> plt.Figure:
    """Two panels of the report's ``backfill`` block, with M(o,o) and M(n,n) as lines."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), dpi=120, sharey=True)
    _merges_panel(axes[0], report.backfill)
    _orders_panel(axes[1], report.backfill, report.method)
    for ax in axes:
        _reference_lines(ax, report.upgrade)
        ax.set_xlabel("gallery re-embedded by the new model (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0].set_ylabel("mAP of new-model queries (%, test split)")
    fig.tight_layout()
    return fig


def plot_backfill(report: LiveUpgradeReport, path: Path) -> Path:
    fig = backfill_figure(report)
    fig.savefig(path)
    plt.close(fig)
    return path

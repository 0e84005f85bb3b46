"""The backfill curve as a picture: mAP of the new query model while the gallery is re-embedded.

Drawn with matplotlib's Agg backend, so it works on machines without a display.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LABELS = {"advbct": "AdvBCT (compatible)", "independent": "independent (no compatible training)"}


def backfill_figure(report: dict) -> plt.Figure:
    """The curves of the report's ``backfill`` block, M(o,o) and M(n,n) as lines, the live checks as points."""
    tests, backfill = report["tests"], report["backfill"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, curve in backfill["curves"].items():
        label = f"{LABELS.get(name, name)}, AUC {curve['auc_map']:.2f}"
        ax.plot([100 * f for f in curve["fractions"]], curve["map"], marker="o", ms=3, label=label)
    ax.axhline(tests["old/old"]["map"], color="grey", ls="--", lw=1, label=f"M(o,o) {tests['old/old']['map']:.2f}")
    ax.axhline(tests["new/new"]["map"], color="tab:blue", ls=":", lw=1, label=f"M(n,n) {tests['new/new']['map']:.2f}")
    live = backfill.get("live")
    if live and live["points"]:
        xs = [100 * p["fraction"] for p in live["points"]]
        ax.scatter(xs, [p["map"] for p in live["points"]], marker="x", color="black", zorder=3,
                   label=f"live Milvus answers ({live['probe_queries']} probe queries)")  # fmt: skip
    ax.set_xlabel("gallery re-embedded by the new model (%)")
    ax.set_ylabel("mAP of new-model queries (%)")
    ax.set_title("Retrieval quality during the backfill (test split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def plot_backfill(report: dict, path: Path) -> Path:
    fig = backfill_figure(report)
    fig.savefig(path)
    plt.close(fig)
    return path

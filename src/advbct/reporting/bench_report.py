"""The bench table as markdown and plots (P scores per method, the query x gallery mAP heatmap).

Plots are drawn with matplotlib's Agg backend, so they work on machines without a display.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from advbct.evaluation.results import BenchResults, RunCost, SettingResult, UpgradeReport, pair_name
from advbct.reporting.tables import P_COMP_CAVEAT


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _method_row(method: str, report: UpgradeReport, run: RunCost) -> str:
    scores = report.p_scores
    p_values = (None, None, None) if scores is None else (scores.p_up, scores.p_comp, scores.p_1)
    p_cells = " | ".join(_fmt(value) for value in p_values)
    return (
        f"| {method} | {report.self_test.map:.2f} | {report.cross.map:.2f} | {_fmt(report.cross_vs_independent)} | "
        f"{p_cells} | {'yes' if report.criterion.cross else 'no'} | "
        f"{_fmt(run.seconds, 1)} | {_fmt(run.images_per_s, 0)} |"
    )


def _setting_section(setting: str, block: SettingResult) -> list[str]:
    first = next(iter(block.methods.values()))
    shared = [first.old.map, *(t.map if t is not None else None for t in (first.independent, first.independent_cross))]
    lines = [
        f"## {setting} ({block.old_backbone} -> {block.new_backbone})",
        "",
        "M(o,o) {} · M(\\*,\\*) {} · M(\\*,o) {} (mAP, percent)".format(*(_fmt(v) for v in shared)),
        "",
        "| method | M(n,n) | M(n,o) | M(n,o) / M(\\*,o) | P_up | P_comp | P_1 | M(n,o) > M(o,o) | train s | img/s |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    lines += [_method_row(method, report, block.runs[method]) for method, report in block.methods.items()]
    for name in ("old", "independent"):
        run = block.runs[name]
        lines.append(f"| *{name}* | | | | | | | | {_fmt(run.seconds, 1)} | {_fmt(run.images_per_s, 0)} |")
    if not first.independent_above_old:
        lines += ["", P_COMP_CAVEAT.replace("*", "\\*") + "."]
    return [*lines, ""]


def markdown_table(results: BenchResults) -> str:
    """One section per setting: M(o,o) and M(*,*), then one row per method, then training cost per run."""
    lines = [f"# advbct bench: preset {results.preset}", ""]
    for setting, block in results.settings.items():
        lines += _setting_section(setting, block)
    return "\n".join(lines)


def write_markdown(results: BenchResults, path: Path) -> None:
    path.write_text(markdown_table(results))


def p_scores_figure(results: BenchResults) -> plt.Figure:
    settings = list(results.settings)
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False, sharey=True)
    for ax, setting in zip(axes[0], settings, strict=True):
        reports = results.settings[setting].methods
        methods = list(reports)
        width = 0.27
        for offset, (key, label) in enumerate((("p_up", "P_up"), ("p_comp", "P_comp"), ("p_1", "P_1"))):
            xs = [i + (offset - 1) * width for i in range(len(methods))]
            ax.bar(xs, [getattr(reports[m].p_scores, key) for m in methods], width, label=label)
        ax.axhline(50, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_title(setting)
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("score (50 = no better or worse than the reference)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def heatmap_figure(block: SettingResult, setting: str) -> plt.Figure:
    names = block.models
    values = [[block.matrix[pair_name(q, g)] for g in names] for q in names]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 1.0 * len(names) + 1.5))
    image = ax.imshow(values, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("gallery model")
    ax.set_ylabel("query model")
    ax.set_title(f"mAP (%), {setting}")
    top = max(max(row) for row in values)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="black" if value > top / 2 else "white")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def write_plots(results: BenchResults, out: Path) -> list[Path]:
    """``p_scores.png`` and one ``heatmap_<setting>.png`` per setting; returns the files written."""
    written = []
    fig = p_scores_figure(results)
    fig.savefig(out / "p_scores.png", dpi=120)
    plt.close(fig)
    written.append(out / "p_scores.png")
    for setting, block in results.settings.items():
        fig = heatmap_figure(block, setting)
        path = out / f"heatmap_{setting}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written

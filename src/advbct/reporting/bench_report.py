"""The bench table as markdown and plots (P scores per method, the query x gallery mAP heatmap).

Plots are drawn with matplotlib's Agg backend, so they work on machines without a display.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from advbct.reporting.tables import P_COMP_CAVEAT, independent_above_old


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(results: dict) -> str:
    """One section per setting: M(o,o) and M(*,*), then one row per method, then training cost per run."""
    lines = [f"# advbct bench: preset {results['preset']}", ""]
    for setting, block in results["settings"].items():
        reports = block["methods"]
        first = next(iter(reports.values()))
        old, ind = first["tests"]["old/old"]["map"], first["tests"]["independent/independent"]["map"]
        cross_ind = first["tests"]["independent/old"]["map"]
        lines += [
            f"## {setting} ({block['old_backbone']} -> {block['new_backbone']})",
            "",
            f"M(o,o) {old:.2f} · M(\\*,\\*) {ind:.2f} · M(\\*,o) {cross_ind:.2f} (mAP, percent)",
            "",
            "| method | M(n,n) | M(n,o) | M(n,o) / M(\\*,o) | P_up | P_comp | P_1 | M(n,o) > M(o,o) "
            "| train s | img/s |",
            "|---|---:|---:|---:|---:|---:|---:|:---:|---:|---:|",
        ]
        for method, report in reports.items():
            tests, run = report["tests"], block["runs"][method]
            lines.append(
                f"| {method} | {tests['new/new']['map']:.2f} | {tests['new/old']['map']:.2f} | "
                f"{_fmt(report.get('cross_vs_independent'))} | "
                f"{report['p_up']:.2f} | {report['p_comp']:.2f} | {report['p_1']:.2f} | "
                f"{'yes' if report['criterion'] else 'no'} | "
                f"{_fmt(run['seconds'], 1)} | {_fmt(run['images_per_s'], 0)} |"
            )
        for name in ("old", "independent"):
            run = block["runs"][name]
            lines.append(f"| *{name}* | | | | | | | | {_fmt(run['seconds'], 1)} | {_fmt(run['images_per_s'], 0)} |")
        if not independent_above_old(first["tests"]):
            lines += ["", P_COMP_CAVEAT.replace("*", "\\*") + "."]
        lines.append("")
    return "\n".join(lines)


def write_markdown(results: dict, path: Path) -> None:
    path.write_text(markdown_table(results))


def p_scores_figure(results: dict) -> plt.Figure:
    settings = list(results["settings"])
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False, sharey=True)
    for ax, setting in zip(axes[0], settings, strict=True):
        reports = results["settings"][setting]["methods"]
        methods = list(reports)
        width = 0.27
        for offset, (key, label) in enumerate((("p_up", "P_up"), ("p_comp", "P_comp"), ("p_1", "P_1"))):
            xs = [i + (offset - 1) * width for i in range(len(methods))]
            ax.bar(xs, [reports[m][key] for m in methods], width, label=label)
        ax.axhline(50, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_title(setting)
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("score (50 = no better or worse than the reference)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def heatmap_figure(block: dict, setting: str) -> plt.Figure:
    names = block["models"]
    values = [[block["matrix"][f"{q}/{g}"] for g in names] for q in names]
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


def write_plots(results: dict, out: Path) -> list[Path]:
    """``p_scores.png`` and one ``heatmap_<setting>.png`` per setting; returns the files written."""
    written = []
    fig = p_scores_figure(results)
    fig.savefig(out / "p_scores.png", dpi=120)
    plt.close(fig)
    written.append(out / "p_scores.png")
    for setting, block in results["settings"].items():
        fig = heatmap_figure(block, setting)
        path = out / f"heatmap_{setting}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written

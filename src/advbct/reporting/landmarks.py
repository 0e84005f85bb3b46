"""The landmark benchmarks' report in the terminal: the paper's table (one column per benchmark) and each test's
scores under every protocol or usage."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from advbct.evaluation.landmarks import LandmarkReport


def landmark_table(report: LandmarkReport) -> Table:
    """One column per benchmark (its headline number), one row per test; P scores in the caption."""
    results = report.benchmarks
    table = Table(title="Landmark retrieval (query model / gallery model), percent")
    table.add_column("test")
    for name, result in results.items():
        table.add_column(f"{name}\n{result.headline_name}", justify="right")
    for key in next(iter(results.values())).headline:
        table.add_row(key, *(f"{result.headline[key]:.2f}" for result in results.values()))
    summary = report.summary
    if summary is not None and summary.scores is not None:
        s = summary.scores
        table.caption = f"P_up {s.p_up:.2f}   P_comp {s.p_comp:.2f}   P_1 {s.p_1:.2f}"
    elif summary is not None:
        table.caption = f"P scores undefined: {summary.p_scores_undefined}"
    return table


def _test_line(benchmark: str, scores: dict) -> str:
    if benchmark == "gldv2":
        return "   ".join(f"{usage} mAP@100 {value:.2f}" for usage, value in scores.items())
    return "   ".join(
        f"{p}: mAP {r['map']:.2f} mP@1/5/10 {r['mp@1']:.2f}/{r['mp@5']:.2f}/{r['mp@10']:.2f}" for p, r in scores.items()
    )


def print_landmark_report(report: LandmarkReport, console: Console) -> None:
    console.print(landmark_table(report))
    for name, result in report.benchmarks.items():
        for key, scores in result.tests.items():
            console.print(f"{name} {key}: {_test_line(name, scores)}")

"""Terminal tables for evaluation reports (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

TEST_LABELS = {
    "old/old": "M(o,o)  old test",
    "new/new": "M(n,n)  self test",
    "new/old": "M(n,o)  cross test",
    "independent/independent": "M(*,*)  independent",
    "independent/old": "M(*,o)  independent cross",
}
METRICS = (("map", "mAP"), ("map_at_r", "mAP@R"), ("top1", "top-1"), ("top5", "top-5"))


def report_table(report: dict) -> Table:
    table = Table(title="Compatibility test (query model / gallery model), percent")
    table.add_column("test")
    for _, label in METRICS:
        table.add_column(label, justify="right")
    for key, values in report["tests"].items():
        table.add_row(TEST_LABELS.get(key, key), *(f"{values[m]:.2f}" for m, _ in METRICS))
    return table


def print_report(report: dict, console: Console) -> None:
    console.print(report_table(report))
    if "p_up" in report:
        console.print(f"P_up {report['p_up']:.2f}   P_comp {report['p_comp']:.2f}   P_1 {report['p_1']:.2f}")
    console.print(f"empirical criterion M(n,o) > M(o,o): {_verdict(report['criterion'])}")
    console.print(f"self test M(n,n) > M(o,o): {_verdict(report['self_criterion'])}")
    if "cross_vs_independent" in report:
        console.print(f"cross test / independent cross test M(n,o) / M(*,o): {report['cross_vs_independent']:.2f}x")


def _verdict(holds: bool) -> str:
    return "[green]yes[/]" if holds else "[red]no[/]"


def comparison_table(reports: dict[str, dict], title: str) -> Table:
    """One row per method: self and cross tests (mAP) and the P scores; M(o,o) and M(*,*) in the caption."""
    any_report = next(iter(reports.values()))
    old, ind = any_report["tests"]["old/old"]["map"], any_report["tests"]["independent/independent"]["map"]
    table = Table(title=title, caption=f"M(o,o) = {old:.2f}   M(*,*) = {ind:.2f}   (mAP, percent)")
    for name in ("method", "M(n,n)", "M(n,o)", "P_up", "P_comp", "P_1", "M(n,o) > M(o,o)"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for method, report in reports.items():
        tests = report["tests"]
        table.add_row(
            method,
            f"{tests['new/new']['map']:.2f}",
            f"{tests['new/old']['map']:.2f}",
            f"{report['p_up']:.2f}",
            f"{report['p_comp']:.2f}",
            f"{report['p_1']:.2f}",
            "yes" if report["criterion"] else "no",
        )
    return table

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
    verdict = "[green]yes[/]" if report["criterion"] else "[red]no[/]"
    console.print(f"empirical criterion M(n,o) > M(o,o): {verdict}")

"""Terminal tables for evaluation reports (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from advbct.evaluation.results import (
    CROSS,
    INDEPENDENT,
    INDEPENDENT_CROSS,
    OLD,
    SELF,
    LiveUpgradeReport,
    UpgradeReport,
)

TEST_LABELS = {
    OLD: "M(o,o)  old test",
    SELF: "M(n,n)  self test",
    CROSS: "M(n,o)  cross test",
    INDEPENDENT: "M(*,*)  independent",
    INDEPENDENT_CROSS: "M(*,o)  independent cross",
}
METRICS = (("map", "mAP"), ("map_at_r", "mAP@R"), ("top1", "top-1"), ("top5", "top-5"))


def report_table(report: UpgradeReport) -> Table:
    table = Table(title="Compatibility test (query model / gallery model), percent")
    table.add_column("test")
    for _, label in METRICS:
        table.add_column(label, justify="right")
    for key, test in report.tests().items():
        table.add_row(TEST_LABELS[key], *(f"{test.metrics[m]:.2f}" for m, _ in METRICS))
    return table


P_COMP_CAVEAT = (
    "M(*,*) <= M(o,o): the independent model is no better than the old one, so P_comp (which divides by "
    "M(*,*) - M(o,o)) and P_1 mean nothing here"
)


def _coloured_yes_no(holds: bool) -> str:
    return "[green]yes[/]" if holds else "[red]no[/]"


def print_report(report: UpgradeReport, console: Console) -> None:
    console.print(report_table(report))
    scores = report.p_scores
    if scores is not None:
        console.print(f"P_up {scores.p_up:.2f}   P_comp {scores.p_comp:.2f}   P_1 {scores.p_1:.2f}")
        if not report.independent_above_old:
            console.print(f"[yellow]{P_COMP_CAVEAT}[/]")
    console.print(f"empirical criterion M(n,o) > M(o,o): {_coloured_yes_no(report.criterion.cross)}")
    console.print(f"self test M(n,n) > M(o,o): {_coloured_yes_no(report.criterion.self_test)}")
    if report.cross_vs_independent is not None:
        console.print(f"cross test / independent cross test M(n,o) / M(*,o): {report.cross_vs_independent:.2f}x")


def _shared_caption(report: UpgradeReport) -> str:
    """The tests every method of a comparison shares, by their short names."""
    shared = (("M(o,o)", report.old), ("M(*,*)", report.independent), ("M(*,o)", report.independent_cross))
    return "   ".join(f"{label} = {test.map:.2f}" for label, test in shared if test is not None)


def comparison_table(reports: dict[str, UpgradeReport], title: str) -> Table:
    """One row per method: self and cross tests (mAP), the cross test over the independent model's, the P scores
    and the criterion; the shared tests and the short column names are explained in the caption, so the table
    fits an 80-column terminal without cutting method names."""
    first = next(iter(reports.values()))
    caption = f"{_shared_caption(first)}   (mAP, percent)\nratio: M(n,o) / M(*,o)   crit: M(n,o) > M(o,o)"
    if not first.independent_above_old:
        caption += f"\n[yellow]{P_COMP_CAVEAT}[/]"
    table = Table(title=title, caption=caption, pad_edge=False)
    table.add_column("method", no_wrap=True, min_width=max(len(method) for method in reports))
    for name in ("M(n,n)", "M(n,o)", "ratio", "P_up", "P_comp", "P_1", "crit"):
        table.add_column(name, justify="right")
    for method, report in reports.items():
        ratio, scores = report.cross_vs_independent, report.p_scores
        p_cells = ["-"] * 3 if scores is None else [f"{v:.2f}" for v in (scores.p_up, scores.p_comp, scores.p_1)]
        table.add_row(
            method,
            f"{report.self_test.map:.2f}",
            f"{report.cross.map:.2f}",
            "-" if ratio is None else f"{ratio:.2f}",
            *p_cells,
            "yes" if report.criterion.cross else "no",
        )
    return table


def headline_curves(backfill: dict) -> dict[str, dict]:
    """Each model's curve in the order and merge the live service uses."""
    return {name: curves[backfill["headline"]] for name, curves in backfill["curves"].items()}


def backfill_table(backfill: dict) -> Table:
    """mAP and top-1 of each model's headline curve at every re-embedded fraction, with its area and lowest point."""
    curves = headline_curves(backfill)
    table = Table(title=f"Backfill curve ({backfill['headline']}): new-model queries, partly re-embedded gallery")
    table.add_column("re-embedded", justify="right")
    for name in curves:
        table.add_column(f"{name} mAP", justify="right")
        table.add_column(f"{name} top-1", justify="right")
    fractions = next(iter(curves.values()))["fractions"]
    for i, fraction in enumerate(fractions):
        cells = [f"{x:.2f}" for c in curves.values() for x in (c["map"][i], c["top1"][i])]
        table.add_row(f"{100 * fraction:.0f}%", *cells)
    table.add_row("AUC", *[x for c in curves.values() for x in (f"{c['auc_map']:.2f}", f"{c['auc_top1']:.2f}")])
    table.add_row("lowest", *[x for c in curves.values() for x in (f"{c['min_map']:.2f}", "")])
    return table


def backfill_policy_table(backfill: dict) -> Table:
    """Every curve of the report by order and merge: its areas, lowest point and worst negative-flip rate."""
    old_map = backfill["old_map"]
    table = Table(title="Backfill orders and merges (test split; areas are means over 0, 10, ..., 100%)")
    for name in ("model", "order / merge", "AUC mAP", "AUC top-1", "lowest mAP", "worst flips %"):
        table.add_column(name, justify="left" if name in ("model", "order / merge") else "right")
    for model, curves in backfill["curves"].items():
        for key, c in curves.items():
            lowest = f"{c['min_map']:.2f}" if c["min_map"] >= old_map else f"[red]{c['min_map']:.2f}[/]"
            flips = "-" if c["max_negative_flips"] is None else f"{c['max_negative_flips']:.2f}"
            table.add_row(model, key, f"{c['auc_map']:.2f}", f"{c['auc_top1']:.2f}", lowest, flips)
    table.caption = f"M(o,o) = {old_map:.2f}; a lowest point below it in red"
    return table


def verdict(report: LiveUpgradeReport) -> str:
    """One line: whether the upgrade went live at once, and what the backfill brings."""
    gate = report.gate
    old, cross, new = report.upgrade.old.map, report.upgrade.cross.map, report.upgrade.self_test.map
    if gate["generation"] is None:
        return (
            f"upgrade refused by the gate on the validation split: M(n,o) {gate['new/old']:.2f}, "
            f"M(n,n) {gate['new/new']:.2f}, M(o,o) {gate['old/old']:.2f}; generation 1 still serves"
        )
    compared = ">" if cross > old else "<="
    state = "live at once" if not gate.get("forced") else "forced live although the gate refused it"
    line = f"upgrade {state}: M(n,o) {cross:.2f} {compared} M(o,o) {old:.2f}; after the backfill M(n,n) {new:.2f}"
    curve = headline_curves(report.backfill).get(gate["candidate"])
    if curve is not None:
        regress = "never below" if curve["min_map"] >= old else "falls below"
        line += f"; during it {regress} M(o,o) (lowest {curve['min_map']:.2f})"
    return line


def print_live_report(report: LiveUpgradeReport, console: Console) -> None:
    """The gate's numbers, the backfill curves, the live check and the verdict."""
    gate = report.gate
    decision = "passed" if gate["passed"] else "refused"
    console.print(
        f"gate ({gate['candidate']}, validation split): M(o,o) {gate['old/old']:.2f}, M(n,n) {gate['new/new']:.2f}, "
        f"M(n,o) {gate['new/old']:.2f}: {decision}"
    )
    console.print(backfill_table(report.backfill))
    console.print(backfill_policy_table(report.backfill))
    live = report.backfill["live"]
    if live is not None and live["max_difference"] is not None:
        fractions = ", ".join(f"{100 * p['fraction']:.0f}%" for p in live["points"])
        console.print(
            f"live Milvus answers at {fractions} re-embedded ({live['probe_queries']} probe queries) match the "
            f"exact curve within {live['max_difference']:.3f} points"
        )
    style = "green" if report.upgrade.criterion.upgrade_ok and gate["generation"] is not None else "yellow"
    console.print(f"[bold {style}]{verdict(report)}[/]")

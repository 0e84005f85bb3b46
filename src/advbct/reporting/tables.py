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
# The tests every method of a comparison shares, with their short names ("M(o,o)", ...) for captions.
SHARED_TESTS = tuple(
    (key, TEST_LABELS[key].split()[0]) for key in ("old/old", "independent/independent", "independent/old")
)
METRICS = (("map", "mAP"), ("map_at_r", "mAP@R"), ("top1", "top-1"), ("top5", "top-5"))


def report_table(report: dict) -> Table:
    table = Table(title="Compatibility test (query model / gallery model), percent")
    table.add_column("test")
    for _, label in METRICS:
        table.add_column(label, justify="right")
    for key, values in report["tests"].items():
        table.add_row(TEST_LABELS.get(key, key), *(f"{values[m]:.2f}" for m, _ in METRICS))
    return table


P_COMP_CAVEAT = (
    "M(*,*) <= M(o,o): the independent model is no better than the old one, so P_comp (which divides by "
    "M(*,*) - M(o,o)) and P_1 mean nothing here"
)


def independent_above_old(tests: dict) -> bool:
    """Whether P_comp's reference gap M(*,*) - M(o,o) in a report's ``tests`` is positive, the case its formula is
    made for."""
    return tests["independent/independent"]["map"] > tests["old/old"]["map"]


def _coloured_yes_no(holds: bool) -> str:
    return "[green]yes[/]" if holds else "[red]no[/]"


def print_report(report: dict, console: Console) -> None:
    console.print(report_table(report))
    if "p_up" in report:
        console.print(f"P_up {report['p_up']:.2f}   P_comp {report['p_comp']:.2f}   P_1 {report['p_1']:.2f}")
        if not independent_above_old(report["tests"]):
            console.print(f"[yellow]{P_COMP_CAVEAT}[/]")
    console.print(f"empirical criterion M(n,o) > M(o,o): {_coloured_yes_no(report['criterion'])}")
    console.print(f"self test M(n,n) > M(o,o): {_coloured_yes_no(report['self_criterion'])}")
    if "cross_vs_independent" in report:
        console.print(f"cross test / independent cross test M(n,o) / M(*,o): {report['cross_vs_independent']:.2f}x")


def comparison_table(reports: dict[str, dict], title: str) -> Table:
    """One row per method: self and cross tests (mAP), the cross test over the independent model's, the P scores
    and the criterion; the shared tests and the short column names are explained in the caption, so the table
    fits an 80-column terminal without cutting method names."""
    tests = next(iter(reports.values()))["tests"]
    shared = "   ".join(f"{label} = {tests[key]['map']:.2f}" for key, label in SHARED_TESTS)
    caption = f"{shared}   (mAP, percent)\nratio: M(n,o) / M(*,o)   crit: M(n,o) > M(o,o)"
    if not independent_above_old(tests):
        caption += f"\n[yellow]{P_COMP_CAVEAT}[/]"
    table = Table(title=title, caption=caption, pad_edge=False)
    table.add_column("method", no_wrap=True, min_width=max(len(method) for method in reports))
    for name in ("M(n,n)", "M(n,o)", "ratio", "P_up", "P_comp", "P_1", "crit"):
        table.add_column(name, justify="right")
    for method, report in reports.items():
        table.add_row(
            method,
            f"{report['tests']['new/new']['map']:.2f}",
            f"{report['tests']['new/old']['map']:.2f}",
            f"{report['cross_vs_independent']:.2f}" if "cross_vs_independent" in report else "-",
            f"{report['p_up']:.2f}",
            f"{report['p_comp']:.2f}",
            f"{report['p_1']:.2f}",
            "yes" if report["criterion"] else "no",
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


def verdict(report: dict) -> str:
    """One line: whether the upgrade went live at once, and what the backfill brings."""
    tests, gate = report["tests"], report["gate"]
    old, cross, new = (tests[k]["map"] for k in ("old/old", "new/old", "new/new"))
    if gate["generation"] is None:
        return (
            f"upgrade refused by the gate on the validation split: M(n,o) {gate['new/old']:.2f}, "
            f"M(n,n) {gate['new/new']:.2f}, M(o,o) {gate['old/old']:.2f}; generation 1 still serves"
        )
    compared = ">" if cross > old else "<="
    state = "live at once" if not gate.get("forced") else "forced live although the gate refused it"
    line = f"upgrade {state}: M(n,o) {cross:.2f} {compared} M(o,o) {old:.2f}; after the backfill M(n,n) {new:.2f}"
    curve = headline_curves(report["backfill"]).get(gate["candidate"])
    if curve is not None:
        regress = "never below" if curve["min_map"] >= old else "falls below"
        line += f"; during it {regress} M(o,o) (lowest {curve['min_map']:.2f})"
    return line


def print_live_report(report: dict, console: Console) -> None:
    """The gate's numbers, the backfill curves, the live check and the verdict."""
    gate = report["gate"]
    decision = "passed" if gate["passed"] else "refused"
    console.print(
        f"gate ({gate['candidate']}, validation split): M(o,o) {gate['old/old']:.2f}, M(n,n) {gate['new/new']:.2f}, "
        f"M(n,o) {gate['new/old']:.2f}: {decision}"
    )
    console.print(backfill_table(report["backfill"]))
    console.print(backfill_policy_table(report["backfill"]))
    live = report["backfill"]["live"]
    if live is not None and live["max_difference"] is not None:
        fractions = ", ".join(f"{100 * p['fraction']:.0f}%" for p in live["points"])
        console.print(
            f"live Milvus answers at {fractions} re-embedded ({live['probe_queries']} probe queries) match the "
            f"exact curve within {live['max_difference']:.3f} points"
        )
    style = "green" if report["upgrade_ok"] and gate["generation"] is not None else "yellow"
    console.print(f"[bold {style}]{verdict(report)}[/]")

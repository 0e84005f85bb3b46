"""The terminal report, the comparison table and the bench markdown: what they print and when they warn."""

import pytest
from rich.console import Console

from advbct.evaluation import upgrade_report
from advbct.reporting import comparison_table, print_report
from advbct.reporting.bench_report import markdown_table


def _report(old: float, new: float, cross: float, independent: float, independent_cross: float) -> dict:
    maps = {"old/old": old, "new/new": new, "new/old": cross}
    maps |= {"independent/independent": independent, "independent/old": independent_cross}
    metrics = {key: {"map": value, "map_at_r": value / 2, "top1": value, "top5": value} for key, value in maps.items()}
    return upgrade_report(metrics)


def test_upgrade_report_holds_both_checks_and_the_cross_ratio():
    # Both criteria hold; the cross test is 12.37 / 1.24 = 9.976x the independent model's.
    report = _report(11.61, 18.08, 12.37, 14.79, 1.24)
    assert report["criterion"] and report["self_criterion"] and report["upgrade_ok"]
    assert report["cross_vs_independent"] == pytest.approx(9.976, abs=5e-4)
    weak_self = _report(11.61, 11.0, 12.37, 14.79, 1.24)
    assert weak_self["criterion"] and not weak_self["self_criterion"] and not weak_self["upgrade_ok"]


def test_upgrade_report_without_independent_has_no_ratio():
    tests = {key: {"map": value} for key, value in (("old/old", 10.0), ("new/new", 12.0), ("new/old", 11.0))}
    report = upgrade_report(tests)
    assert "cross_vs_independent" not in report and "p_up" not in report
    assert report["upgrade_ok"]


def _printed(report: dict) -> str:
    console = Console(record=True, width=120)
    print_report(report, console)
    return console.export_text()


def test_report_prints_both_checks_and_the_cross_ratio():
    text = _printed(_report(11.61, 18.08, 12.37, 14.79, 1.25))
    assert "empirical criterion M(n,o) > M(o,o): yes" in text
    assert "self test M(n,n) > M(o,o): yes" in text
    assert "M(n,o) / M(*,o): 9.90x" in text  # 12.37 / 1.25 = 9.896
    assert "mean nothing" not in text


def test_report_warns_when_the_independent_model_is_below_the_old_one():
    report = _report(14.02, 15.0, 14.5, 13.40, 1.3)
    # A cross test above the old test scores *below* 50: 100 sigmoid((14.5 - 14.02) / (13.40 - 14.02)) = 31.56.
    assert report["p_comp"] == pytest.approx(31.56, abs=0.005)
    text = _printed(report)
    assert "M(*,*) <= M(o,o)" in text and "mean nothing" in text


def test_comparison_table_keeps_method_names_whole_in_80_columns():
    reports = {name: _report(11.61, 18.08, 12.37, 14.79, 1.24) for name in ("advbct", "advbct-fixed-radius", "bct")}
    console = Console(record=True, width=80)
    console.print(comparison_table(reports, "extended-data"))
    text = console.export_text()
    assert "advbct-fixed-radius" in text and "9.98" in text and "…" not in text
    assert "ratio: M(n,o) / M(*,o)" in text and "mean nothing" not in text


def _bench_results(independent: float) -> dict:
    runs = {name: {"seconds": 10.0, "images_per_s": 100.0} for name in ("old", "independent", "advbct")}
    block = {"methods": {"advbct": _report(4.88, 4.95, 2.01, independent, 1.86)}, "runs": runs}
    return {"preset": "smoke", "settings": {"extended-class": {**block, "old_backbone": "a", "new_backbone": "b"}}}


def test_bench_markdown_has_the_ratio_column_and_the_caveat_only_where_it_applies():
    below = markdown_table(_bench_results(4.82))
    row = next(line for line in below.splitlines() if line.startswith("| advbct |"))
    assert row.startswith("| advbct | 4.95 | 2.01 | 1.08 |")  # 2.01 / 1.86 = 1.081
    assert "M(\\*,\\*) <= M(o,o)" in below
    assert "mean nothing" not in markdown_table(_bench_results(6.0))


def test_a_curve_above_another_everywhere_before_the_end():
    from advbct.reporting.markdown import _above_everywhere

    mine = {"fractions": [0.0, 0.5, 1.0], "map": [3.0, 4.0, 5.0]}
    # Above at 0 and 0.5; the end (t = 1) is the self tests, which compatible training is not asked to win.
    assert _above_everywhere(mine, {"map": [2.0, 3.9, 9.0]})
    assert not _above_everywhere(mine, {"map": [2.0, 4.0, 1.0]}), "equal is not above"

"""The terminal report, the comparison table and the bench markdown: what they print and when they warn."""

import json
from pathlib import Path

import pytest
from rich.console import Console

from advbct.evaluation import TestResult, UpgradeReport
from advbct.evaluation.results import BenchResults, LiveUpgradeReport, RunCost, SettingResult
from advbct.reporting import comparison_table, print_report
from advbct.reporting.bench_report import markdown_table
from advbct.reporting.markdown import above_before_the_end, render, seed_summary_markdown


def _test(value: float) -> TestResult:
    return TestResult({"map": value, "map_at_r": value / 2, "top1": value, "top5": value})


def _report(old: float, new: float, cross: float, independent: float, independent_cross: float) -> UpgradeReport:
    return UpgradeReport(_test(old), _test(new), _test(cross), _test(independent), _test(independent_cross))


def test_upgrade_report_holds_both_checks_and_the_cross_ratio():
    # Both criteria hold; the cross test is 12.37 / 1.24 = 9.976x the independent model's.
    report = _report(11.61, 18.08, 12.37, 14.79, 1.24)
    assert report.criterion.cross and report.criterion.self_test and report.criterion.upgrade_ok
    assert report.cross_vs_independent == pytest.approx(9.976, abs=5e-4)
    weak_self = _report(11.61, 11.0, 12.37, 14.79, 1.24)
    assert weak_self.criterion.cross and not weak_self.criterion.self_test and not weak_self.criterion.upgrade_ok


def test_upgrade_report_without_independent_has_no_ratio():
    report = UpgradeReport(TestResult({"map": 10.0}), TestResult({"map": 12.0}), TestResult({"map": 11.0}))
    assert report.cross_vs_independent is None and report.p_scores is None
    assert report.to_json() == {
        "tests": {"old/old": {"map": 10.0}, "new/new": {"map": 12.0}, "new/old": {"map": 11.0}},
        "criterion": True,
        "self_criterion": True,
        "upgrade_ok": True,
    }


def test_upgrade_report_json_has_the_results_json_layout_and_reads_back():
    # M(o,o) 40, M(n,n) 60, M(n,o) 50, M(*,*) 60, M(*,o) 2: P_up = 100 sigmoid(0) = 50,
    # P_comp = 100 sigmoid((50 - 40) / (60 - 40)) = 100 sigmoid(0.5) = 62.2459,
    # P_1 = 2 * 50 * 62.2459 / 112.2459 = 55.4550.
    report = _report(40.0, 60.0, 50.0, 60.0, 2.0)
    data = report.to_json()
    assert list(data) == ["tests", "p_up", "p_comp", "p_1", "cross_vs_independent", "criterion", "self_criterion",
                          "upgrade_ok"]  # fmt: skip
    assert list(data["tests"]) == ["old/old", "new/new", "new/old", "independent/independent", "independent/old"]
    assert data["tests"]["new/old"] == {"map": 50.0, "map_at_r": 25.0, "top1": 50.0, "top5": 50.0}
    assert data["p_up"] == pytest.approx(50.0)
    assert data["p_comp"] == pytest.approx(62.2459, abs=1e-4)
    assert data["p_1"] == pytest.approx(55.4550, abs=1e-4)
    assert data["cross_vs_independent"] == pytest.approx(25.0)
    assert UpgradeReport.from_json(data) == report


def _printed(report: UpgradeReport) -> str:
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
    assert report.p_scores.p_comp == pytest.approx(31.56, abs=0.005)
    text = _printed(report)
    assert "M(*,*) <= M(o,o)" in text and "mean nothing" in text


def test_comparison_table_keeps_method_names_whole_in_80_columns():
    reports = {name: _report(11.61, 18.08, 12.37, 14.79, 1.24) for name in ("advbct", "advbct-fixed-radius", "bct")}
    console = Console(record=True, width=80)
    console.print(comparison_table(reports, "extended-data"))
    text = console.export_text()
    assert "advbct-fixed-radius" in text and "9.98" in text and "…" not in text
    assert "ratio: M(n,o) / M(*,o)" in text and "mean nothing" not in text


def _bench_results(independent: float) -> BenchResults:
    runs = {name: RunCost(10.0, 100.0) for name in ("old", "independent", "advbct")}
    methods = {"advbct": _report(4.88, 4.95, 2.01, independent, 1.86)}
    block = SettingResult(methods, {}, ["old", "independent", "advbct"], runs, "a", "b")
    return BenchResults("smoke", {"extended-class": block})


def test_bench_markdown_has_the_ratio_column_and_the_caveat_only_where_it_applies():
    below = markdown_table(_bench_results(4.82))
    row = next(line for line in below.splitlines() if line.startswith("| advbct |"))
    assert row.startswith("| advbct | 4.95 | 2.01 | 1.08 |")  # 2.01 / 1.86 = 1.081
    assert "M(\\*,\\*) <= M(o,o)" in below
    assert "mean nothing" not in markdown_table(_bench_results(6.0))


def test_a_curve_above_another_everywhere_before_the_end():
    mine = {"fractions": [0.0, 0.5, 1.0], "map": [3.0, 4.0, 5.0]}
    # Above at 0 and 0.5; the end (t = 1) is the self tests, which compatible training is not asked to win.
    assert above_before_the_end(mine, {"map": [2.0, 3.9, 9.0]})
    assert not above_before_the_end(mine, {"map": [2.0, 4.0, 1.0]}), "equal is not above"


REPORT_RUNS = Path(__file__).parent / "report_runs"


def test_advbct_report_renders_stored_run_folders_unchanged():
    # Two results.json files as a smoke quickstart and a smoke compare (bct, advbct) write them, and the markdown
    # `advbct report` gives for them: results.json is read through the typed results and must keep rendering so.
    runs = [REPORT_RUNS / "smoke-quickstart", REPORT_RUNS / "smoke-compare"]
    assert render(runs) == (REPORT_RUNS / "expected.md").read_text()


def test_the_typed_reports_write_back_exactly_the_results_json_they_read():
    quickstart = json.loads((REPORT_RUNS / "smoke-quickstart" / "results.json").read_text())
    assert json.dumps(LiveUpgradeReport.from_json(quickstart).to_json()) == json.dumps(quickstart)
    compare = json.loads((REPORT_RUNS / "smoke-compare" / "results.json").read_text())
    typed = {method: UpgradeReport.from_json(report).to_json() for method, report in compare.items()}
    assert json.dumps(typed) == json.dumps(compare)


def _candidate_run(folder: Path, method: str, options: dict, old: float, split: str) -> Path:
    """A compare run folder holding one method trained with ``options``, as `advbct compare` leaves it."""
    (folder / method).mkdir(parents=True)
    (folder / method / "config.json").write_text(json.dumps({"compat": {"method": method, "options": options}}))
    report = _report(old, 20.0 + len(options), 12.0, 21.0, 1.5).to_json()
    (folder / "results.json").write_text(json.dumps({method: {**report, "split": split}}))
    return folder


def test_candidates_sharing_old_and_independent_models_make_one_table_labelled_by_their_options(tmp_path: Path):
    median = _candidate_run(tmp_path / "median", "advbct-tight", {"radius": "median"}, 9.0, "validation")
    warmup = _candidate_run(tmp_path / "warm", "advbct-tight", {"elastic": True, "tau": 0.5}, 9.0, "validation")
    other_old = _candidate_run(tmp_path / "other", "advbct-tight", {}, 7.5, "validation")
    # A run records every option; the label names those that differ from the method's defaults.
    recorded = {"tau": 1.0, "elastic": False, "discriminator": "class-conditional", "radius": "min"}
    full = _candidate_run(tmp_path / "full", "advbct-tight", recorded, 9.0, "validation")
    tables = render([median, warmup, other_old, full]).split("| method |")
    assert len(tables) == 3, "the run with another old model gets a table of its own"
    first = tables[1]
    assert "| advbct-tight (radius=median) | 21.00 | 12.00 |" in first
    assert "| advbct-tight (elastic=true, tau=0.5) | 22.00 | 12.00 |" in first
    assert "| advbct-tight (discriminator=class-conditional) | 24.00 | 12.00 |" in first
    assert "validation split; M(o,o) 9.00" in first
    assert "| advbct-tight | 20.00 | 12.00 |" in tables[2] and "validation split; M(o,o) 7.50" in tables[2]


def _seed_set_run(folder: Path, allocation: str, seed: int, old: float, independent: float, methods: dict) -> Path:
    """A compare run folder of one seed set: ``methods`` maps a method to its (M(n,n), M(n,o))."""
    (folder / "old").mkdir(parents=True)
    config = {"data": {"allocation": allocation, "allocation_seed": seed}, "seed": 10 * seed}
    (folder / "old" / "config.json").write_text(json.dumps(config))
    results = {
        method: {**_report(old, new, cross, independent, 1.0).to_json(), "split": "test"}
        for method, (new, cross) in methods.items()
    }
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_a_comparison_repeated_over_seed_sets_gets_one_summary_table(tmp_path: Path):
    # Each seed set's M(n,n) and M(n,o) are chosen so that (M(n,n) - M(*,*)) / M(*,*) and
    # (M(n,o) - M(o,o)) / (M(*,*) - M(o,o)) are -0.5, 0 or 0.5: P_up and P_comp are then 100 sigmoid of those,
    # 37.7541, 50 or 62.2459, and P_1 their harmonic mean: 50 and 50 give 50, 50 and 62.2459 give 55.4550,
    # 62.2459 and 62.2459 give 62.2459, 62.2459 and 37.7541 give 47.0007, 37.7541 and 37.7541 give 37.7541.
    # Seed set 0 (M(o,o) 10, M(*,*) 20): lce is best in P_1 (62.25) and ties advbct in M(n,o) (15), but is not a
    # row, since seed set 2 did not run it.
    s0 = {"advbct": (20.0, 15.0), "bct": (30.0, 10.0), "l2": (10.0, 5.0), "lce": (30.0, 15.0)}
    # Seed set 1 (M(o,o) 12, M(*,*) 24), in two folders: advbct and l2 tie for the best M(n,o), 18.
    s1 = {"advbct": (36.0, 18.0), "bct": (24.0, 12.0), "l2": (24.0, 18.0)}
    # Seed set 2 (M(o,o) 6, M(*,*) 12).
    s2 = {"advbct": (12.0, 9.0), "bct": (18.0, 3.0), "l2": (12.0, 6.0)}
    runs = [
        _seed_set_run(tmp_path / "s0", "extended-data", 0, 10.0, 20.0, s0),
        _seed_set_run(tmp_path / "s1", "extended-data", 1, 12.0, 24.0, s1),
        _seed_set_run(tmp_path / "s1-lce", "extended-data", 1, 12.0, 24.0, {"lce": (24.0, 12.0)}),
        _seed_set_run(tmp_path / "s2", "extended-data", 2, 6.0, 12.0, s2),
        _seed_set_run(tmp_path / "ec", "extended-class", 0, 10.0, 20.0, {"advbct": (20.0, 15.0)}),
    ]
    text = render(runs)
    assert text.count("| method |") == 5, "a table per seed set and allocation, then one summary of extended-data"
    summary = text[text.rindex("- `s0`") :].splitlines()
    named = zip(runs[:4], [0, 1, 1, 2], strict=True)
    assert summary[:4] == [f"- `{run.name}`: extended-data, allocation seed {seed}, old seed {10 * seed}, new seed ? "
                           "(no run.json: command not recorded)" for run, seed in named]  # fmt: skip
    assert summary[4:11] == [
        "",
        "| method | M(n,n) | M(n,o) | P_1 | cross test passes | best M(n,o) | best P_1 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| advbct | 22.67 (12.00 to 36.00) | 14.00 (9.00 to 18.00) | 57.72 (55.45 to 62.25) | 3/3 | 3/3 | 2/3 |",
        "| bct | 24.00 (18.00 to 30.00) | 8.33 (3.00 to 12.00) | 50.82 (47.00 to 55.45) | 0/3 | 0/3 | 0/3 |",
        "| l2 | 15.33 (10.00 to 24.00) | 9.67 (5.00 to 18.00) | 47.74 (37.75 to 55.45) | 1/3 | 1/3 | 0/3 |",
        "",
    ]
    assert summary[11].startswith("mAP in percent, test split, extended-data, 3 seed sets: mean (lowest to highest); "
                                  "mean M(o,o) 9.33, mean M(\\*,\\*) 18.67; best:")  # fmt: skip
    assert summary[12:] == [], "the extended-class run (one seed set) has no summary"


def test_a_seed_summary_refuses_runs_of_two_allocations(tmp_path: Path):
    runs = [
        _seed_set_run(tmp_path / "ed", "extended-data", 0, 10.0, 20.0, {"bct": (20.0, 15.0)}),
        _seed_set_run(tmp_path / "ec", "extended-class", 1, 12.0, 24.0, {"bct": (20.0, 15.0)}),
    ]
    with pytest.raises(ValueError, match="one split and allocation, got test split, extended-class; test split"):
        seed_summary_markdown(runs)

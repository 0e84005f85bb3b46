"""The typed results: per-method reports picked out of a (query model x gallery model) matrix, checked against
hand-worked scores, and written in the results.json layout that ``advbct report`` reads back."""

import pytest

from advbct.evaluation.results import BenchResults, RunCost, SettingResult, TestResult, method_pairs, method_reports

# mAP of each (query model / gallery model) test; every cell differs, so a report reading a wrong cell shows.
MAPS = {
    "old/old": 40.0, "independent/independent": 60.0, "independent/old": 2.0,
    "bct/bct": 55.0, "bct/old": 41.0, "advbct/advbct": 62.0, "advbct/old": 45.0,
    "old/advbct": 7.0, "advbct/bct": 9.0, "bct/advbct": 11.0,
}  # fmt: skip


def _matrix() -> dict[str, TestResult]:
    return {key: TestResult({"map": value, "top1": value + 1}) for key, value in MAPS.items()}


def test_the_pairs_each_method_needs():
    assert method_pairs(["bct", "advbct"]) == [
        ("old", "old"), ("independent", "independent"), ("independent", "old"),
        ("bct", "bct"), ("bct", "old"), ("advbct", "advbct"), ("advbct", "old"),
    ]  # fmt: skip


def test_each_method_report_reads_its_own_cells_and_the_shared_ones():
    reports = method_reports(_matrix(), ["bct", "advbct"])
    advbct = reports["advbct"].to_json()
    assert {key: test["map"] for key, test in advbct["tests"].items()} == {
        "old/old": 40.0, "new/new": 62.0, "new/old": 45.0, "independent/independent": 60.0, "independent/old": 2.0,
    }  # fmt: skip
    # P_up = 100 s(2 / 60) = 50.8333, P_comp = 100 s(5 / 20) = 56.2177, P_1 their harmonic mean 53.3900.
    assert advbct["p_up"] == pytest.approx(50.8333, abs=1e-4)
    assert advbct["p_comp"] == pytest.approx(56.2177, abs=1e-4)
    assert advbct["p_1"] == pytest.approx(53.3900, abs=1e-4)
    assert advbct["cross_vs_independent"] == pytest.approx(22.5)
    assert advbct["criterion"] and advbct["self_criterion"] and advbct["upgrade_ok"]
    bct = reports["bct"].to_json()
    # M(n,n) 55 < M(*,*) 60: P_up = 100 s(-5 / 60) = 47.9179; M(n,o) 41: P_comp = 100 s(1 / 20) = 51.2497.
    assert bct["p_up"] == pytest.approx(47.9179, abs=1e-4)
    assert bct["p_comp"] == pytest.approx(51.2497, abs=1e-4)
    assert bct["p_1"] == pytest.approx(49.5278, abs=1e-4)
    assert bct["tests"]["new/old"] == {"map": 41.0, "top1": 42.0}


def test_bench_results_round_trip_through_their_json():
    reports = method_reports(_matrix(), ["bct", "advbct"])
    runs = {"old": RunCost(12.5, 800.0), "advbct": RunCost(20.0, None)}
    block = SettingResult(reports, {"old/old": 40.0}, ["old", "advbct"], runs, "resnet18", "resnet50")
    results = BenchResults("smoke", {"extended-class": block})
    data = results.to_json()
    assert data["settings"]["extended-class"]["runs"]["advbct"] == {"seconds": 20.0, "images_per_s": None}
    assert list(data["settings"]["extended-class"]) == ["methods", "matrix", "models", "runs", "old_backbone",
                                                         "new_backbone"]  # fmt: skip
    assert BenchResults.from_json(data) == results

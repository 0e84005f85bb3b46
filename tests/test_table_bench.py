"""`advbct bench --preset smoke`: the full table on every setting, its JSON, markdown and plots, and re-runs."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from paper_scores import reference_p_scores

SETTINGS = ("extended-class", "extended-data", "extended-backbone")
METHODS = ("l2", "bct", "lce", "unibct", "hot-refresh", "advbct", "advbct-tight")


def run_bench(folder, out, cache, *extra):
    command = [sys.executable, "-m", "advbct", "bench", "--preset", "smoke", "--out", str(out), "--data", str(folder),
               "--no-progress", "-o", "common.data.dataset=image-folder", "-o", "common.device=cpu",
               *extra]  # fmt: skip
    env = {**os.environ, "ADVBCT_CACHE": str(cache)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def test_bench_smoke_writes_the_table_json_and_plots(tiny_folder, tmp_path):
    out = tmp_path / "bench"
    # Two old models train at once in processes (extended-backbone's is extended-class's, copied), then the new
    # models of all three settings in one pool, two at a time (the re-run below: one at a time).
    result = run_bench(tiny_folder, out, tmp_path / "cache", "--jobs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 at a time, in processes)" in result.stdout
    lines = result.stdout.splitlines()
    finished = [line.split("finished: ")[1].split(" (")[0] for line in lines if "finished:" in line]
    assert sorted(finished[:2]) == ["extended-class/old", "extended-data/old"]
    assert sorted(finished[2:]) == sorted(f"{s}/{m}" for s in SETTINGS for m in ("independent", *METHODS))
    assert "old model: the same as extended-class's, copied" in result.stdout
    old_models = [(out / s / "old" / "model.pt").read_bytes() for s in ("extended-class", "extended-backbone")]
    assert old_models[0] == old_models[1]
    results = json.loads((out / "results.json").read_text())
    assert tuple(results["settings"]) == SETTINGS
    for block in results["settings"].values():
        assert tuple(block["methods"]) == METHODS
        assert block["models"] == ["old", "independent", *METHODS]
        assert len(block["matrix"]) == len(block["models"]) ** 2
        assert all(0.0 <= value <= 100.0 for value in block["matrix"].values())
        for report in block["methods"].values():
            maps = {key: test["map"] for key, test in report["tests"].items()}
            # Which matrix cells each report reads is checked on hand-made numbers in test_results.py.
            expected = reference_p_scores(
                [maps["old/old"]], [maps["independent/independent"]], [maps["new/new"]], [maps["new/old"]]
            )
            assert {k: report[k] for k in expected} == pytest.approx(expected)
        for run in block["runs"].values():
            assert run["seconds"] > 0 and run["images_per_s"] > 0
    backbone = results["settings"]["extended-backbone"]
    assert backbone["old_backbone"] != backbone["new_backbone"]

    markdown = (out / "results.md").read_text()
    for setting in SETTINGS:
        assert f"## {setting}" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| advbct |")]
    assert len(rows) == 3
    advbct = results["settings"]["extended-class"]["methods"]["advbct"]
    maps = {key: advbct["tests"][key]["map"] for key in ("new/new", "new/old", "independent/old")}
    ratio = maps["new/old"] / maps["independent/old"]
    assert advbct["cross_vs_independent"] == pytest.approx(ratio)
    assert f"| {maps['new/new']:.2f} | {maps['new/old']:.2f} | {ratio:.2f} |" in rows[0]

    for name in ("p_scores.png", *(f"heatmap_{s}.png" for s in SETTINGS)):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200

    models = sorted(out.rglob("model.pt"))
    assert len(models) == 3 * (2 + len(METHODS))
    stamps = {path: path.stat().st_mtime_ns for path in models}
    again = run_bench(tiny_folder, out, tmp_path / "cache")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {path: path.stat().st_mtime_ns for path in models} == stamps, "finished runs are not trained again"
    assert json.loads((out / "results.json").read_text())["settings"] == results["settings"]

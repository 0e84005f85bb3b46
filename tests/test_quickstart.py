"""The main job end to end through the real CLI on real PNG files and a real Milvus Lite gallery: a refused
upgrade that leaves generation 1 serving untouched, then the same run folder deployed and backfilled, its
backfill curve recomputed here from embeddings of the gallery's own files."""

import json

import numpy as np
import pytest
import torch

from advbct.serving.models import Embedder
from advbct.serving.registry import ModelRegistry
from advbct.serving.store import GalleryStore
from test_pipeline import check_results_dict, run_cli

METHOD = "advbct-tight"  # the smoke preset's compatible model, as the built-in default's


def _quickstart(folder, out, *overrides):
    args = ["quickstart", "--preset", "smoke", "--data", str(folder), "--out", str(out), "--no-progress",
            "-o", "common.data.dataset=image-folder", "-o", "common.device=cpu"]  # fmt: skip
    for item in overrides:
        args += ["-o", item]
    return run_cli(*args)


def _gallery_files(out):
    """The gallery's item files by id (the test images' positions) and their labels (sorted class folders)."""
    root = out / "gallery" / "images"
    files = sorted(root.rglob("*.png"), key=lambda p: int(p.stem))
    classes = sorted({f.parent.name for f in files})
    return files, torch.tensor([classes.index(f.parent.name) for f in files])


def _stored(out, dim):
    """Every stored item's generation and vector. The Milvus Lite server this opens is stopped afterwards: it
    holds the file until then, and the next command (another process) must open it."""
    from milvus_lite.server_manager import server_manager_instance

    path = str(out / "gallery" / "gallery.db")
    store = GalleryStore(path, dim)
    try:
        rows = store.get(list(range(store.count())), with_vectors=True)
    finally:
        store.close()
        server_manager_instance.release_server(path)
    return {int(r["id"]): (int(r["generation"]), np.asarray(r["vector"])) for r in rows}


def _reference_scores(queries, gallery, labels, refreshed=None, calibration=None):
    """mAP, top-1 and each query's top-1 hit by an explicit ranking per query, each query's own item left out.
    With ``calibration`` (the report's Platt parameters), re-embedded items score by the "same" scaling of their
    cosine and the others by the "cross" one."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    aps, hits_at_1 = [], []
    for i in range(len(q)):
        score = g @ q[i]
        if calibration is not None:
            score = score.astype(np.float64)  # the affine maps in float64, an independent rounding
            same, cross = calibration["same"], calibration["cross"]
            score = np.where(refreshed, same["scale"] * score + same["bias"], cross["scale"] * score + cross["bias"])
        ranked = [j for j in np.argsort(-score, kind="stable") if j != i]
        relevant = np.array([labels[j] == labels[i] for j in ranked])
        hits_at_1.append(bool(relevant[0]) if relevant.any() else None)
        if relevant.any():
            hits = np.cumsum(relevant)
            aps.append(np.sum(hits[relevant] / (np.flatnonzero(relevant) + 1)) / relevant.sum())
    tops = [h for h in hits_at_1 if h is not None]
    return 100 * np.mean(aps), 100 * np.mean(tops), hits_at_1


def _check_curve(curve, queries, old, labels, order, old_hits, calibration=None):
    """Every point of a report's curve against the explicit ranking of the mixed gallery."""
    for fraction, map_, top1, flips in zip(
        curve["fractions"], curve["map"], curve["top1"], curve["negative_flips"], strict=True
    ):
        gallery, refreshed = old.copy(), np.zeros(len(old), dtype=bool)
        refreshed[order[: round(fraction * len(old))]] = True
        gallery[refreshed] = queries[refreshed]
        expected_map, expected_top1, hits = _reference_scores(queries, gallery, labels, refreshed, calibration)
        flipped = sum(1 for before, after in zip(old_hits, hits, strict=True) if before and after is False)
        assert map_ == pytest.approx(expected_map, abs=1e-3), fraction
        assert top1 == pytest.approx(expected_top1, abs=1e-3), fraction
        assert flips == pytest.approx(100 * flipped / sum(h is not None for h in hits), abs=1e-3), fraction
    assert curve["auc_map"] == pytest.approx(np.mean(curve["map"]))
    assert curve["min_map"] == pytest.approx(min(curve["map"]))


def test_refused_then_forced_upgrade_through_the_whole_flow(tiny_folder, tmp_path):
    out = tmp_path / "run"
    refused = _quickstart(tiny_folder, out, "live.candidate=independent")
    assert refused.returncode == 0, refused.stdout + refused.stderr
    assert "upgrade refused by the gate on the validation split" in refused.stdout
    assert "M(n,o)  cross test" in refused.stdout
    for part in ("old/stats.pt", "old/allocation.json", "independent/model.pt", "gallery/gallery.db"):
        assert (out / part).exists(), part
    assert list((out / METHOD / "tb").iterdir()), "TensorBoard events written"
    report = json.loads((out / "results.json").read_text())
    check_results_dict(report)
    assert report["method"] == METHOD
    gate = report["gate"]
    assert gate["candidate"] == "independent" and gate["split"] == "validation"
    assert gate["passed"] is False and gate["generation"] is None
    assert gate["passed"] == (gate["new/old"] > gate["old/old"] and gate["new/new"] > gate["old/old"])
    assert report["backfill"]["live"] is None
    assert report["gallery"] == {"items": 30, "active_generation": 1, "by_generation": {"1": 30}}
    registry = ModelRegistry(out / "gallery" / "gallery.db.registry.sqlite")
    assert [g.number for g in registry.generations] == [1] and registry.active.number == 1
    files, labels = _gallery_files(out)
    old = Embedder(out / "old" / "model.pt").embed_files(files)
    stored = _stored(out, old.shape[1])
    assert sorted(stored) == list(range(30)), "every test image once"
    for i, (generation, vector) in stored.items():
        assert generation == 1
        np.testing.assert_allclose(vector, old[i], atol=1e-5)

    # The same folder again: the models are kept, the compatible model is deployed (forced: the smoke models are too
    # small to pass the gate reliably) and the gallery backfilled to generation 2.
    trained = {part: (out / part).stat().st_mtime_ns for part in ("old/model.pt", f"{METHOD}/model.pt")}
    forced = _quickstart(tiny_folder, out, "live.force=true")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert {part: (out / part).stat().st_mtime_ns for part in trained} == trained, "finished models are kept"
    report = json.loads((out / "results.json").read_text())
    assert report["gate"]["generation"] == 2 and report["gate"]["forced"] == (not report["gate"]["passed"])
    assert report["gallery"] == {"items": 30, "active_generation": 2, "by_generation": {"2": 30}}
    assert (out / "backfill.png").stat().st_size > 0
    new = Embedder(out / METHOD / "model.pt").embed_files(files)
    for i, (generation, vector) in _stored(out, new.shape[1]).items():
        assert generation == 2
        np.testing.assert_allclose(vector, new[i], atol=1e-5)
    independent = Embedder(out / "independent" / "model.pt").embed_files(files)

    order = torch.randperm(30, generator=torch.Generator().manual_seed(0)).numpy()
    backfill = report["backfill"]
    assert backfill["headline"] == "random/calibrated"
    assert set(backfill["curves"][METHOD]) == {
        "random/raw",
        *(f"{o}/calibrated" for o in ("random", "uncertainty", "centre-distance", "oracle")),
    }
    assert backfill["curves"][METHOD]["oracle/calibrated"]["fractions"] == [i / 10 for i in range(11)]
    _, _, old_hits = _reference_scores(old, old, labels.numpy())
    _check_curve(backfill["curves"][METHOD]["random/raw"], new, old, labels.numpy(), order, old_hits)
    assert set(backfill["curves"]["independent"]) == {"random/calibrated"}
    for name, queries in ((METHOD, new), ("independent", independent)):
        calibration = backfill["calibration"][name]
        curve = backfill["curves"][name]["random/calibrated"]
        _check_curve(curve, queries, old, labels.numpy(), order, old_hits, calibration)
    assert report["gate"]["calibration"] == backfill["calibration"][METHOD], "the service merges as reported"
    live = report["backfill"]["live"]
    assert [p["fraction"] for p in live["points"]] == [0.0, 0.5, 1.0] and live["not_measured"] == []
    assert live["max_difference"] < 1e-3
    headline = backfill["curves"][METHOD]["random/calibrated"]
    assert report["tests"]["new/old"]["map"] == pytest.approx(headline["map"][0], abs=1e-3)

    # The study command on the same folder gives the curves the quickstart reported, from the checkpoints alone.
    studied = run_cli("backfill-curves", str(out), "--methods", METHOD, "--data", str(tiny_folder), "--no-progress")
    assert studied.returncode == 0, studied.stdout + studied.stderr
    study = json.loads((out / "backfill_study.json").read_text())
    assert study["calibration"] == backfill["calibration"]
    assert set(study["curves"][METHOD]) == {
        f"{o}/{m}" for o in ("random", "uncertainty", "centre-distance", "oracle") for m in ("raw", "calibrated")
    }
    for name in (METHOD, "independent"):
        for key, curve in backfill["curves"][name].items():
            if curve["fractions"] == study["curves"][name][key]["fractions"]:
                assert study["curves"][name][key] == curve
    # Without --methods a quickstart folder's study looks at the model the quickstart deployed.
    random_only = run_cli("backfill-curves", str(out), "--orders", "random", "--merges", "raw", "--data",
                          str(tiny_folder), "--no-progress")  # fmt: skip
    assert random_only.returncode == 0, random_only.stderr
    narrow = json.loads((out / "backfill_study.json").read_text())["curves"]
    assert {name: set(c) for name, c in narrow.items()} == {METHOD: {"random/raw"}, "independent": {"random/raw"}}
    assert narrow[METHOD]["random/raw"] == backfill["curves"][METHOD]["random/raw"]
    unknown = run_cli("backfill-curves", str(out), "--orders", "fifo", "--no-progress")
    assert unknown.returncode == 2 and "unknown orders or merges ['fifo']" in unknown.stderr
    missing = run_cli("backfill-curves", str(tmp_path / "nowhere"), "--no-progress")
    assert missing.returncode == 2 and "lacks" in missing.stderr and "Traceback" not in missing.stderr

    # The docs' tables are rendered from the folder: the command and machine from run.json, the numbers from
    # results.json and backfill_study.json.
    rendered = run_cli("report", str(out))
    assert rendered.returncode == 0, rendered.stderr
    text = rendered.stdout
    info = json.loads((out / "run.json").read_text())
    assert info["command"].startswith("advbct quickstart --preset smoke") and info["machine"]["cores"] >= 1
    assert f"`{info['command']}`" in text
    old_old, new_old = report["tests"]["old/old"]["map"], report["tests"]["new/old"]["map"]
    assert f"| run | {METHOD} | {old_old:.2f} | {new_old:.2f} ({new_old - old_old:+.2f}) |" in text
    assert f"| {METHOD} | random | raw |" in text and "| independent | random | raw |" in text
    nothing = run_cli("report", str(tmp_path / "nowhere"))
    assert nothing.returncode == 2 and "no results.json" in nothing.stderr

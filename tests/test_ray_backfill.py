"""The backfill on Ray Data (``advbct backfill --engine ray``) on a local Ray with two CPUs: a whole backfill on
Milvus Lite with an undecodable image skipped and listed, an order written first and kept vectors restored after a
rollback, the one-line refusal where Ray is not installed, and (slow) a driver killed with SIGKILL mid-way on a
Milvus server and restarted."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from advbct.serving.ledger import ItemLedger
from advbct.serving.models import Embedder
from advbct.serving.registry import ModelRegistry
from conftest import GalleryDb, build_gallery, run_advbct, write_image_folder


def needs_ray() -> None:
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'advbct[ray]')")


def expected_vectors(model, image_root, files) -> dict[str, np.ndarray]:
    """Each file's vector as the single-process backfill's embedder makes it, by reference."""
    return {str(f.relative_to(image_root)): v for f, v in zip(files, Embedder(model).embed_files(files), strict=True)}


@pytest.fixture
def local_ray():
    """Ray on this machine, started in this process as the engine starts it (a start that times out on a busy
    machine is tried again) and shut down after the test."""
    needs_ray()
    import ray

    from advbct.serving.ray_backfill import connect

    assert connect(ray, None), "no Ray was running in this process before the test"
    yield ray
    ray.shutdown()


def test_a_ray_backfill_re_embeds_the_gallery_and_lists_an_undecodable_item(three_models, image_root, tmp_path):
    needs_ray()
    db, registry = GalleryDb(str(tmp_path / "gallery.db")), tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, db, registry)
    files = sorted((image_root / "train").rglob("*.png"))  # ids follow the sorted files
    expected = expected_vectors(three_models["new"], image_root, files)
    files[7].write_bytes(b"truncated")
    ref = str(files[7].relative_to(image_root))

    run = run_advbct("backfill", "--engine", "ray", *db.args, "--registry", str(registry),
                     "--image-root", str(image_root), "--batch-size", "4", "--order", "random")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    progress_lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"done"')]
    assert progress_lines and progress_lines[-1]["done"] == 39 and progress_lines[-1]["items_per_s"] > 0
    summary = json.loads(run.stdout[run.stdout.rindex('{"state"') :])
    assert summary["state"] == "finished" and summary["done"] == 39 and summary["remaining"] == 0
    assert summary["order"] == "random"
    assert [(s["id"], s["ref"]) for s in summary["skipped"]] == [(7, ref)]
    assert "cannot decode" in summary["skipped"][0]["reason"]

    store = db.open(next(iter(expected.values())).shape[0])
    assert store.generations() == {1: 1, 2: 39}
    ledger = ItemLedger(ModelRegistry(registry), "gallery")
    assert ledger.counts() == {1: 1, 2: 39}, "the registry's counts follow the Ray engine's writes"
    rows = store.get(list(range(40)), with_vectors=True)
    # --order random: the seed-0 permutation of the 40 stale ids, written in that order (item 7 skipped).
    embedded_at = {int(r["id"]): r["embedded_at"] for r in rows}
    order = [i for i in torch.randperm(40, generator=torch.Generator().manual_seed(0)).tolist() if i != 7]
    assert [embedded_at[i] for i in order] == sorted(embedded_at[i] for i in order)
    assert sorted(int(r["id"]) for r in rows) == list(range(40)), "every item exactly once"
    for row in rows:
        if row["id"] == 7:
            assert row["generation"] == 1, "the undecodable item keeps its old vector, still searchable"
            continue
        assert row["generation"] == 2
        np.testing.assert_allclose(np.asarray(row["vector"]), expected[row["ref"]], atol=1e-5)


def test_an_ordered_ray_backfill_writes_the_order_first(three_models, image_root, tmp_path, local_ray):
    from advbct.serving.ray_backfill import RayPlan, run_ray_backfill

    db, registry = GalleryDb(str(tmp_path / "gallery.db")), tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, db, registry)
    generation = ModelRegistry(registry).active
    store = db.open(generation.dim)
    order = [int(i) for i in np.random.default_rng(4).permutation(40)[:12]]
    plan = RayPlan(batch_size=3, shard_size=3)
    progress = run_ray_backfill(store, generation, image_root, plan, order=order)
    assert progress.state == "finished" and progress.done == 40 and progress.skipped == []
    assert store.generations() == {2: 40}
    written_at = {int(r["id"]): float(r["embedded_at"]) for r in store.get(list(range(40)))}
    ordered = [written_at[i] for i in order]
    assert ordered == sorted(ordered), "the order's items are written in the order given"
    assert max(ordered) < min(t for i, t in written_at.items() if i not in order), "and before every other item"

    # After a rollback every item kept generation 1's vector: the Ray backfill swaps them back without embedding
    # (handed the independent model's checkpoint, it still leaves generation 1's own vectors).
    registry_models = ModelRegistry(registry)
    assert registry_models.rollback().number == 1
    stranger = dataclasses.replace(registry_models.active, path=str(three_models["independent"]))
    back = run_ray_backfill(store, stranger, image_root, plan)
    assert back.state == "finished" and back.done == 40
    old = expected_vectors(three_models["old"], image_root, sorted((image_root / "train").rglob("*.png")))
    for row in store.get(list(range(40)), with_vectors=True):
        assert (row["generation"], row["previous_generation"]) == (1, 2)
        np.testing.assert_allclose(row["vector"], old[row["ref"]], atol=1e-5)


def test_without_ray_the_ray_engine_is_refused_in_one_line(three_models, image_root, tmp_path):
    db, registry = GalleryDb(str(tmp_path / "gallery.db")), tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, db, registry)
    # A None entry in sys.modules makes `import ray` raise ImportError, as where Ray is not installed.
    script = "import sys; sys.modules['ray'] = None; from advbct.cli import main; main()"
    args = ["backfill", "--engine", "ray", *db.args, "--registry", str(registry), "--image-root", str(image_root)]
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'advbct[ray]'" in lines[0], run.stderr
    assert db.open(Embedder(three_models["old"]).dim).generations() == {1: 40}, "nothing was re-embedded"


@pytest.mark.slow
@pytest.mark.parametrize("gallery_db", [pytest.param("server", marks=pytest.mark.slow)], indirect=True)
def test_a_ray_backfill_killed_mid_way_on_a_server_resumes_with_nothing_lost_or_doubled(
    three_models, tmp_path, gallery_db
):
    needs_ray()
    image_root = write_image_folder(tmp_path / "images", classes=4, train_per_class=50, test_per_class=4, seed=5)
    registry = tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, gallery_db, registry)
    files = sorted((image_root / "train").rglob("*.png"))
    store = gallery_db.open(Embedder(three_models["new"]).dim)
    assert store.generations() == {1: 200}
    command = [sys.executable, "-m", "advbct", "backfill", "--engine", "ray", *gallery_db.args,
               "--registry", str(registry), "--image-root", str(image_root), "--batch-size", "4"]  # fmt: skip
    with (tmp_path / "killed.log").open("w") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 240
        while store.count("generation == 2") < 20 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started, workers included
        driver.wait()
    written = store.count("generation == 2")
    log = (tmp_path / "killed.log").read_text()
    assert 20 <= written < 200, f"the job was killed mid-way ({written} of 200 re-embedded): {log}"

    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, f"{finished.stdout[-2000:]}\n{finished.stderr[-4000:]}"
    summary = json.loads(finished.stdout[finished.stdout.rindex('{"state"') :])
    assert summary["state"] == "finished" and summary["skipped"] == []
    # A write the killed driver had sent may still land after the count above; none is done twice.
    assert 0 < summary["done"] <= 200 - written, "the restart re-embeds only what the killed job left"

    assert store.count() == 200 and store.generations() == {2: 200}
    rows = store.get(list(range(200)), with_vectors=True)
    assert sorted(int(r["id"]) for r in rows) == list(range(200)), "every item exactly once"
    sample = [files[i] for i in np.random.default_rng(0).choice(200, size=24, replace=False)]
    expected = expected_vectors(three_models["new"], image_root, sample)
    by_ref = {row["ref"]: row for row in rows}
    for ref, vector in expected.items():
        assert by_ref[ref]["generation"] == 2
        np.testing.assert_allclose(np.asarray(by_ref[ref]["vector"]), vector, atol=1e-5)

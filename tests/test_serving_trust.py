"""The serving side under the failures users meet: concurrent writers, a CLI beside a running server, hostile
images, bad options, a file another process holds, a folder added twice, a rollback and roll-forward, a gallery
of an older schema."""

import json
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families

from advbct.data.batches import normalise
from advbct.data.images import DataError, load_image_folder
from advbct.models.checkpoint import load_checkpoint, save_checkpoint
from advbct.serving.backfill import run_backfill
from advbct.serving.gate import GateRefused, GateResult, ValidationSize, bootstrap_interval, describe_gate
from advbct.serving.metrics import ServiceMetrics
from advbct.serving.models import Embedder
from advbct.serving.registry import ModelRegistry
from advbct.serving.store import GalleryStore, StoreError
from conftest import GalleryDb, build_gallery, run_advbct, write_image_folder


def png_header_only(width: int, height: int) -> bytes:
    """A 65-byte PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_concurrent_uploads_get_unique_ids_and_are_all_stored(service):
    client, state, root = service
    image = sorted((root / "train").rglob("*.png"))[0].read_bytes()

    def upload(i: int) -> list[int]:
        response = client.post("/items", files={"image": (f"u{i}.png", image)})
        assert response.status_code == 200, response.text
        return response.json()["ids"]

    with ThreadPoolExecutor(8) as pool:
        ids = [i for batch in pool.map(upload, range(16)) for i in batch]
    assert len(set(ids)) == 16 and min(ids) == 40
    assert {int(r["id"]) for r in state.store.get(ids)} == set(ids)
    assert client.get("/health").json()["items"] == 56


def test_a_cli_rollback_and_upgrade_beside_the_server_are_seen_and_never_erased(service, three_models, tmp_path):
    client, state, root = service
    registry = str(state.config.registry)
    rollback = run_advbct("rollback", "--db", state.config.db, "--registry", registry)
    assert rollback.returncode == 0, rollback.stderr
    assert client.get("/health").json()["active"] == 1
    image = sorted((root / "train").rglob("*.png"))[0].read_bytes()
    added = client.post("/items", files={"image": ("after.png", image)}).json()["ids"][0]
    assert ModelRegistry(registry).active.number == 1, "a registry write by the server keeps the CLI's rollback"
    assert state.store.get([added])[0]["generation"] == 1

    forward = run_advbct("upgrade", "--model", str(three_models["new"]), "--validation", str(root / "test"),
                         "--db", state.config.db, "--registry", registry, "--force",
                         "--reason", "roll forward")  # fmt: skip
    assert forward.returncode == 0, forward.stderr
    models = client.get("/models").json()
    assert models["active"] == 2 and len(models["generations"]) == 2, "a roll-forward reuses generation 2"


def test_twenty_upgrade_and_rollback_cycles_leave_the_thread_count_flat(service, three_models):
    client, _, root = service

    def ours() -> list[str]:
        return sorted(t.name for t in threading.enumerate() if t.name.startswith("advbct-"))

    for _ in range(20):
        assert client.post("/models/rollback").status_code == 200
        forward = client.post("/models", json={"path": str(three_models["new"]), "validation": str(root / "test"),
                                               "force": True, "reason": "cycle test"})  # fmt: skip
        assert forward.status_code == 200, forward.text
    assert client.get("/models").json()["active"] == 2
    assert ours() in (["advbct-batcher"], ["advbct-backfill", "advbct-batcher"]), ours()


def test_a_paused_backfill_stays_paused_through_a_rollback(service):
    client, state, _ = service
    client.post("/backfill/pause")
    assert client.post("/models/rollback").status_code == 200
    assert state.pause.is_set()


def test_bombs_and_an_empty_path_list_get_a_4xx(service):
    client, _, _ = service
    for width, height in [(100_000, 100_000), (10_000, 10_000)]:
        bomb = client.post("/search", files={"image": ("bomb.png", png_header_only(width, height))})
        assert bomb.status_code == 413, bomb.text
        assert "pixels" in bomb.json()["detail"]
    empty = client.post("/items/by-path", json={"paths": []})
    assert empty.status_code == 400 and "empty" in empty.json()["detail"]
    assert client.get("/health").json()["items"] == 40


def _one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_bad_cli_options_and_a_bomb_exit_2_without_a_traceback(three_models, image_root, tmp_path):
    db = GalleryDb(str(tmp_path / "gallery.db"))
    add = run_advbct("index", "add", str(image_root / "train"), *db.args, "--image-root", str(image_root),
                     "--model", str(three_models["old"]))  # fmt: skip
    assert add.returncode == 0, add.stderr
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(100_000, 100_000))
    _one_line_error(run_advbct("index", "search", str(bomb), *db.args), "bomb.png")
    _one_line_error(run_advbct("index", "search", str(bomb), *db.args, "-k", "1000000000"), "-k")
    _one_line_error(run_advbct("backfill", *db.args, "--workers", "0"), "--workers 0")
    _one_line_error(run_advbct("backfill", *db.args, "--worker", "5", "--workers", "2"), "--worker 5")
    _one_line_error(run_advbct("backfill", *db.args, "--batch-size", "0"), "--batch-size")
    _one_line_error(run_advbct("serve", *db.args, "--port", "80000"), "--port")


def test_a_lite_file_held_by_another_process_is_refused_in_one_line(three_models, image_root, tmp_path):
    db = GalleryDb(str(tmp_path / "gallery.db"))
    add = run_advbct("index", "add", str(image_root / "train"), *db.args, "--image-root", str(image_root),
                     "--model", str(three_models["old"]))  # fmt: skip
    assert add.returncode == 0, add.stderr
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from pymilvus import MilvusClient; c = MilvusClient({db.uri!r}); print('open', "
         "flush=True); import time; time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "open"
        _one_line_error(run_advbct("index", "stats", *db.args), "another process")
    finally:
        holder.kill()
        holder.wait()


def test_adding_a_folder_again_adds_only_what_is_missing(three_models, image_root, tmp_path):
    db = GalleryDb(str(tmp_path / "gallery.db"))
    folder = image_root / "train"
    files = sorted(folder.rglob("*.png"))
    broken = folder / "zz_broken.png"
    broken.write_bytes(b"not an image")
    args = ["index", "add", str(folder), *db.args, "--image-root", str(image_root), "--batch-size", "16"]
    first = run_advbct(*args, "--model", str(three_models["old"]))
    _one_line_error(first, "zz_broken.png")
    broken.unlink()
    second = run_advbct(*args)
    assert second.returncode == 0, second.stderr
    third = run_advbct(*args)
    assert third.returncode == 0 and "added 0 items" in third.stdout, third.stdout
    store = GalleryStore(db.uri, Embedder(three_models["old"]).dim)
    refs = [r["ref"] for r in store.get(list(range(store.count() + 16)))]
    assert sorted(refs) == sorted(str(f.relative_to(image_root)) for f in files)
    store.close()


def test_the_registry_serialises_id_reservations_across_processes(tmp_path):
    path = tmp_path / "registry.sqlite"
    ModelRegistry(path)
    script = (f"from advbct.serving.registry import ModelRegistry\nr = ModelRegistry({str(path)!r})\n"
              "print(*[r.reserve_ids(3) for _ in range(50)])")  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    starts = [int(s) for p in procs for s in p.communicate(timeout=120)[0].split()]
    assert sorted(starts) == list(range(0, 600, 3)), "every block of three ids handed out once"
    assert ModelRegistry(path).reserve_ids(1) == 600


def test_an_undecodable_item_is_skipped_listed_and_the_rest_re_embedded(three_models, image_root, tmp_path):
    db, registry = GalleryDb(str(tmp_path / "gallery.db")), tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, db, registry)
    victim = sorted((image_root / "train").rglob("*.png"))[7]  # ids follow the sorted files
    victim.write_bytes(b"truncated")
    ref = str(victim.relative_to(image_root))
    run = run_advbct("backfill", *db.args, "--registry", str(registry), "--image-root", str(image_root),
                     "--batch-size", "4")  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout[run.stdout.rindex('{"state"') :])
    assert summary["state"] == "finished" and summary["done"] == 39
    assert [(s["id"], s["ref"]) for s in summary["skipped"]] == [(7, ref)]
    assert "cannot decode" in summary["skipped"][0]["reason"]
    store = db.open(Embedder(ModelRegistry(registry).active.path).dim)
    assert store.generations() == {1: 1, 2: 39}
    assert store.get([7])[0]["generation"] == 1, "the undecodable item keeps its old vector, still searchable"


def test_forcing_past_the_gate_needs_a_reason_and_records_it(three_models, image_root, tmp_path):
    registry = ModelRegistry(tmp_path / "registry.sqlite")
    registry.register_first(three_models["old"])
    with pytest.raises(DataError, match="needs a reason"):
        registry.upgrade(three_models["new"], image_root / "test", force=True)
    generation = registry.upgrade(three_models["new"], image_root / "test", force=True, reason="load test")
    assert generation.gate.forced and generation.gate.reason == "load test" and generation.gate.forced_by
    assert ModelRegistry(tmp_path / "registry.sqlite").active.gate == generation.gate


def test_the_bootstrap_interval_on_hand_checked_cases():
    constant = bootstrap_interval(torch.full((1, 50), 2.5), resamples=200, level=0.95, seed=0)
    assert constant.tolist() == [[2.5, 2.5]], "every resample of a constant has that mean"
    # Two queries worth 0 and 1: a resample's mean is 0, 0.5 or 1 with chances 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% points of 2000 resamples are 0 and 1.
    two = bootstrap_interval(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), resamples=2000, level=0.95, seed=3)
    assert two.tolist() == [[0.0, 1.0], [1.0, 1.0]]
    spread = torch.tensor([[-1.0, 3.0] * 40])
    low, high = bootstrap_interval(spread, resamples=500, level=0.9, seed=1)[0].tolist()
    assert -1.0 <= low < 1.0 < high <= 3.0, "around the mean 1, within the values"
    assert bootstrap_interval(spread, 500, 0.9, 1).tolist() == [[low, high]], "seeded: the same interval again"
    with pytest.raises(ValueError, match="at least one query"):
        bootstrap_interval(torch.zeros(2, 0), 10, 0.95, 0)


# A gate record as the registry stores it, keys in their stored order: a forced upgrade on a set too small to decide.
FORCED_RECORD = {
    "old/old": 41.25,
    "new/new": 43.5,
    "new/old": 40.75,
    "margins": {
        "new/old": {"point": -0.5, "low": -2.0, "high": 1.0},
        "new/new": {"point": 2.25, "low": 0.5, "high": 4.0},
    },
    "validation": {"images": 16, "queries": 16, "classes": 4},
    "bootstrap": {"resamples": 1000, "level": 0.95, "seed": 0},
    "decided": False,
    "undecided": "the validation set is too small to decide",
    "passed": False,
    "confident": False,
    "calibration": {"same": {"scale": 12.5, "bias": -6.0}, "cross": {"scale": 10.0, "bias": -5.5}},
    "forced": True,
    "forced_by": "operator",
    "reason": "load test",
}


def test_a_stored_gate_record_reads_back_to_the_same_json():
    unforced = {"old/old": 41.25, "new/new": 43.5, "new/old": 42.0, "passed": True, "forced": False}
    # A calibration without the evidence (a record from before the gate measured intervals): searches rank by it.
    calibrated = {"old/old": 41.25, "new/new": 43.5, "new/old": 42.0, "passed": True,
                  "calibration": FORCED_RECORD["calibration"]}  # fmt: skip
    for record in (FORCED_RECORD, unforced, calibrated):
        gate = GateResult.from_json(record)
        assert json.dumps(gate.to_json()) == json.dumps(record), "same keys, same order, same values"
    forced = GateResult.from_json(FORCED_RECORD)
    assert not forced.decided and forced.forced_by == "operator" and forced.evidence.cross_margin.low == -2.0
    assert describe_gate(forced).startswith("the validation set is too small to decide; measured M(n,o) 40.75")
    plain = GateResult.from_json({"old/old": 41.25, "new/new": 43.5, "new/old": 42.0, "passed": True})
    assert plain.decided and plain.evidence is None and plain.calibration is None
    assert describe_gate(plain) == "M(n,o) 42.00, M(n,n) 43.50, M(o,o) 41.25 (both must exceed M(o,o))"


def test_the_gate_refuses_to_decide_on_too_small_a_validation_set(three_models, image_root, tmp_path):
    registry = ModelRegistry(tmp_path / "registry.sqlite")
    registry.register_first(three_models["old"])
    message = r"cannot be gated .* too small to decide: 16 scored queries in 4 classes .* at least 100 queries in 10"
    with pytest.raises(GateRefused, match=message):
        registry.upgrade(three_models["new"], image_root / "test")
    assert [g.number for g in registry.generations] == [1] and registry.active.number == 1
    numbers = registry.check_gate(three_models["new"], image_root / "test")
    assert numbers.decided is False and numbers.passed is False
    assert numbers.evidence.validation == ValidationSize(images=16, queries=16, classes=4)


def _better_compatible_checkpoint(old: Path, train_folder: Path, out: Path) -> Path:
    """The old model plus a label-informative component: its embedding, plus a ridge-regression map from its
    backbone features to the old embedding's class centres on the labelled training images. Both are affine in
    the backbone's features, so their sum is one projection and one bias: a checkpoint of the same architecture
    whose queries land nearer their class in the old model's space (compatible) and which ranks its own embeddings
    better, without any training."""
    model, meta = load_checkpoint(old)
    train = load_image_folder(train_folder, meta.prep.image_size)
    with torch.no_grad():
        features = model.backbone(normalise(train.images, meta.prep))
        embedded = model.bn(model.proj(features))
        centres = torch.stack([F.normalize(embedded[train.labels == c], dim=1).mean(0) for c in train.labels.unique()])
        targets = (centres * embedded.norm(dim=1).mean())[train.labels].double()
        design = torch.cat([features, torch.ones(len(features), 1)], 1).double()
        ridge = design.T @ design + 0.01 * torch.eye(design.shape[1], dtype=torch.float64)
        fitted = torch.linalg.solve(ridge, design.T @ targets).float()
        bn = model.bn
        gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        model.proj.weight.copy_(gain[:, None] * model.proj.weight + fitted[:-1].T)
        bn.bias.copy_(bn.bias - gain * bn.running_mean + fitted[-1])
        bn.running_mean.zero_(), bn.running_var.fill_(1 - bn.eps), bn.weight.fill_(1)
    save_checkpoint(out, model, meta.model_copy(update={"model_id": uuid.uuid4().hex}))
    return out


def test_the_gate_passes_a_better_compatible_model_with_its_intervals(tmp_path, monkeypatch):
    from advbct.pipeline import train_old
    from advbct.presets import train_config

    monkeypatch.setenv("ADVBCT_CACHE", str(tmp_path / "cache"))
    folder = write_image_folder(tmp_path / "data", classes=10, train_per_class=40, test_per_class=10, seed=5)
    overrides = ["data.dataset=image-folder", "device=cpu", "optim.epochs=1", "data.validation_per_class=0"]
    old = train_old(train_config("old", "smoke", None, overrides, str(folder), None), tmp_path / "old", False)
    new = _better_compatible_checkpoint(old, folder / "train", tmp_path / "new.pt")
    registry = ModelRegistry(tmp_path / "registry.sqlite")
    registry.register_first(old)
    generation = registry.upgrade(new, folder / "test")  # not forced
    gate = generation.gate
    assert generation.number == 2 and registry.active.number == 2
    evidence = gate.evidence
    assert gate.passed and gate.decided and not gate.forced
    assert evidence.validation == ValidationSize(images=100, queries=100, classes=10)
    for margin, test in ((evidence.cross_margin, gate.cross), (evidence.self_margin, gate.self_test)):
        assert margin.point == pytest.approx(test.map - gate.old.map)
        assert margin.low <= margin.point <= margin.high and margin.point > 0
    assert evidence.bootstrap == {"resamples": 1000, "level": 0.95, "seed": 0}
    line = describe_gate(gate)
    assert "\n" not in line and f"[{evidence.cross_margin.low:+.2f}, " in line and "100 queries" in line
    assert ModelRegistry(tmp_path / "registry.sqlite").active.gate == gate


def _scrape(client) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus-client's own parser: {(sample name, sorted labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_count_requests_by_route_batches_and_items_by_generation(service):
    client, _, root = service
    query = sorted((root / "train").rglob("*.png"))[0].read_bytes()
    for _ in range(3):
        assert client.get("/health").status_code == 200
    for _ in range(2):
        assert client.post("/search", files={"image": ("q.png", query)}, data={"k": "3"}).status_code == 200
    assert client.get("/items/999/image").status_code == 404
    assert client.get("/items/998/image").status_code == 404
    metrics = _scrape(client)
    requests = "advbct_http_requests_total"
    assert metrics[(requests, (("method", "GET"), ("route", "/health"), ("status", "200")))] == 3
    assert metrics[(requests, (("method", "POST"), ("route", "/search"), ("status", "200")))] == 2
    assert metrics[(requests, (("method", "GET"), ("route", "/items/{item_id}/image"), ("status", "404")))] == 2
    assert metrics[("advbct_http_request_seconds_count", (("method", "POST"), ("route", "/search")))] == 2
    assert metrics[("advbct_http_request_seconds_sum", (("method", "POST"), ("route", "/search")))] > 0
    assert metrics[("advbct_embed_batch_images_count", ())] == 2, "one model call per search, one image each"
    assert metrics[("advbct_embed_batch_images_sum", ())] == 2
    assert metrics[("advbct_gallery_items", (("generation", "1"),))] == 40
    assert metrics[("advbct_backfill_items_done", ())] == 0
    again = _scrape(client)
    assert again[(requests, (("method", "GET"), ("route", "/metrics"), ("status", "200")))] == 1
    ServiceMetrics(), ServiceMetrics()  # a registry per service: a second set of the same names does not collide


def test_progress_counts_are_a_snapshot_that_sums_to_the_items_during_and_after_a_backfill(service):
    client, state, root = service
    samples: list[dict] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            samples.append(client.get("/backfill").json())

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        assert client.post("/backfill/start").status_code == 200
        deadline = time.monotonic() + 120
        while client.get("/backfill").json()["state"] not in ("finished", "failed") and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        done.set()
        poller.join()
    during = [{int(g): n for g, n in s["by_generation"].items()} for s in samples]
    assert all(sum(counts.values()) == 40 for counts in during), during
    assert any(len(counts) == 2 for counts in during), "some samples were taken with both generations present"
    final = client.get("/backfill").json()
    assert final["state"] == "finished" and final["by_generation"] == {"2": 40} and final["remaining"] == 0
    assert state.store.generations() == {2: 40}, "the ledger agrees with a real count"

    image = sorted((root / "train").rglob("*.png"))[0]
    added = client.post("/items", files={"image": ("u.png", image.read_bytes())}).json()["ids"]
    paths = [str(p.relative_to(root)) for p in sorted((root / "test").rglob("*.png"))[:3]]
    added += client.post("/items/by-path", json={"paths": paths}).json()["ids"]
    assert client.delete(f"/items/{added[0]}").status_code == 200
    assert client.get("/backfill").json()["by_generation"] == {"2": 43}
    assert state.store.count() == 43 and state.store.generations() == {2: 43}
    assert client.get("/health").json()["items"] == 43


def _crash_mid_write(db: GalleryDb, registry: Path, dim: int) -> None:
    """A process killed (SIGKILL) after its writes reached Milvus and before the registry settled them: items 0-9
    re-embedded at generation 2 and items 1000-1004 added, as the store's writes journal them."""
    script = f"""
import os
import numpy as np
from advbct.serving.ledger import open_counted_store
from advbct.serving.registry import ModelRegistry
store = open_counted_store(ModelRegistry({str(registry)!r}), {db.uri!r}, {dim})
rows = [{{"id": r["id"], "ref": r["ref"], "vectors": np.concatenate([r["vector"], r["previous_vector"]]),
          "generation": r["generation"], "previous_generation": r["previous_generation"],
          "embedded_at": r["embedded_at"], "bucket": r["id"] % 64}}
        for r in store.get(list(range(10)), with_vectors=True)]
store.ledger.begin([r["id"] for r in rows], 2)
store.client.upsert(store.collection, [{{**r, "generation": 2}} for r in rows])
new = [{{**r, "id": 1000 + i, "bucket": (1000 + i) % 64}} for i, r in enumerate(rows[:5])]
store.ledger.begin([r["id"] for r in new], 2)
store.client.insert(store.collection, new)
store.flush()
os.kill(os.getpid(), 9)
"""
    crashed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr


def test_a_write_killed_between_milvus_and_the_registry_is_repaired_when_the_gallery_opens(
    three_models, image_root, tmp_path
):
    db, registry = GalleryDb(str(tmp_path / "gallery.db")), tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, db, registry)
    dim = Embedder(three_models["old"]).dim
    _crash_mid_write(db, registry, dim)
    with closing(sqlite3.connect(registry)) as sql:
        assert sql.execute("SELECT COUNT(*) FROM pending_writes").fetchone()[0] == 2
        counts = dict(sql.execute("SELECT generation, items FROM item_counts WHERE items > 0").fetchall())
    assert counts == {1: 40}, "the registry has not seen the killed process's writes"

    stats = run_advbct("index", "stats", *db.args, "--registry", str(registry))
    assert stats.returncode == 0, stats.stderr
    reported = json.loads(stats.stdout)
    assert reported["items"] == 45 and reported["by_generation"] == {"1": 35, "2": 10}
    assert reported["reconciled"]["repaired"] == 15 and "interrupted" in reported["reconciled"]["reason"]
    assert reported["reconciled"]["at"] > time.time() - 300

    with closing(sqlite3.connect(registry)) as sql, sql:  # counts made wrong with no write to explain them
        sql.execute("UPDATE items SET generation = 1 WHERE id < 4")
    again = json.loads(run_advbct("index", "stats", *db.args, "--registry", str(registry)).stdout)
    assert again["items"] == 45 and again["by_generation"] == {"1": 35, "2": 10}
    assert "differed from Milvus" in again["reconciled"]["reason"]
    store = db.open(dim)
    assert store.generations() == {1: 35, 2: 10} and store.count() == 45
    store.close()


def test_a_gallery_with_a_segment_file_deleted_is_refused_by_the_cli_and_the_server(three_models, image_root, tmp_path):
    from fastapi.testclient import TestClient

    from advbct.serving.api import ServiceConfig, create_app

    db, registry = GalleryDb(str(tmp_path / "gallery.db")), tmp_path / "registry.sqlite"
    add = run_advbct("index", "add", str(image_root / "train"), *db.args, "--image-root", str(image_root),
                     "--model", str(three_models["old"]), "--registry", str(registry),
                     "--batch-size", "16")  # fmt: skip
    assert add.returncode == 0, add.stderr
    segments = sorted(Path(db.uri).rglob("data_*.parquet"))  # Milvus Lite's sealed segments: the rows themselves
    assert len(segments) == 3, segments
    segments[0].unlink()

    refused = run_advbct("index", "stats", *db.args, "--registry", str(registry))
    _one_line_error(refused, "'gallery'", db.uri, "records 40 items", "Milvus holds 24", "advbct index recount")
    query = sorted((image_root / "test").rglob("*.png"))[0]
    search = run_advbct("index", "search", str(query), *db.args, "--registry", str(registry))
    _one_line_error(search, "records 40 items, Milvus holds 24")

    with TestClient(create_app(ServiceConfig(db.uri, registry, image_root))) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "damaged"
        assert "records 40 items, Milvus holds 24" in health.json()["reason"]
        assert client.get("/backfill").status_code == 503
        assert client.post("/search", files={"image": ("q.png", query.read_bytes())}).status_code == 503
        assert client.app.state.service.backfill_thread is None, "nothing writes to a damaged gallery"
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(db.uri)  # the service's Lite server held the file; the CLI opens it next

    accepted = run_advbct("index", "recount", *db.args, "--registry", str(registry))
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout) == {"recorded": {"1": 40}, "found": {"1": 24}}
    stats = run_advbct("index", "stats", *db.args, "--registry", str(registry))
    assert stats.returncode == 0 and json.loads(stats.stdout)["items"] == 24, stats.stderr


def test_rows_deleted_behind_the_registrys_back_are_refused(three_models, image_root, tmp_path):
    from pymilvus import MilvusClient

    db, registry = GalleryDb(str(tmp_path / "gallery.db")), tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, db, registry)
    client = MilvusClient(db.uri)
    client.delete(db.collection, ids=[3, 4, 5])
    client.close()
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(db.uri)
    _one_line_error(run_advbct("backfill", *db.args, "--registry", str(registry)), "records 40 items, Milvus holds 37")


def _await_backfill(client, generation: int) -> dict:
    """The backfill's status once it finished towards ``generation`` (or failed, or two minutes passed)."""
    deadline = time.monotonic() + 120
    status = client.get("/backfill").json()
    while time.monotonic() < deadline:
        status = client.get("/backfill").json()
        if status["target_generation"] == generation and status["state"] in ("finished", "failed"):
            break
        time.sleep(0.1)
    return status


def test_a_rollback_over_http_restores_kept_vectors_and_a_roll_forward_swaps_them_back(service, three_models):
    client, state, root = service
    files = sorted((root / "train").rglob("*.png"))
    refs = {str(f.relative_to(root)): i for i, f in enumerate(files)}
    old = dict(zip(refs, Embedder(three_models["old"]).embed_files(files), strict=True))
    new = dict(zip(refs, Embedder(three_models["new"]).embed_files(files), strict=True))
    assert client.post("/backfill/start").status_code == 200
    assert _await_backfill(client, 2)["by_generation"] == {"2": 40}

    assert client.post("/models/rollback").json() == {"active": 1}
    back = _await_backfill(client, 1)
    assert (back["state"], back["done"], back["by_generation"]) == ("finished", 40, {"1": 40}), back
    for row in state.store.get(list(range(40)), with_vectors=True):
        assert (row["generation"], row["previous_generation"]) == (1, 2)
        np.testing.assert_allclose(row["vector"], old[row["ref"]], atol=1e-5)
        np.testing.assert_allclose(row["previous_vector"], new[row["ref"]], atol=1e-5)
    hits = client.post("/search", files={"image": ("q.png", files[0].read_bytes())}, data={"k": "40"}).json()
    assert hits["active"] == 1 and {h["generation"] for h in hits["hits"]} == {1} and len(hits["hits"]) == 40

    forward = run_advbct("upgrade", "--model", str(three_models["new"]), "--validation", str(root / "test"),
                         "--db", state.config.db, "--registry", str(state.config.registry), "--force",
                         "--reason", "roll forward")  # fmt: skip
    assert forward.returncode == 0 and json.loads(forward.stdout)["generation"] == 2, forward.stderr
    assert client.get("/health").json()["active"] == 2, "the server follows the CLI's roll-forward"
    again = _await_backfill(client, 2)
    assert (again["state"], again["done"], again["by_generation"]) == ("finished", 40, {"2": 40}), again
    for row in state.store.get(list(range(40)), with_vectors=True):
        np.testing.assert_allclose(row["vector"], new[row["ref"]], atol=1e-5)


def test_a_gallery_of_the_old_schema_is_refused_in_one_line_and_migrated(tmp_path):
    from pymilvus import DataType, MilvusClient

    db = GalleryDb(str(tmp_path / "gallery.db"))
    client = MilvusClient(db.uri)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("ref", DataType.VARCHAR, max_length=2048)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
    schema.add_field("generation", DataType.INT64)
    schema.add_field("embedded_at", DataType.DOUBLE)
    schema.add_field("bucket", DataType.INT64)
    index = client.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="IP")
    client.create_collection(db.collection, schema=schema, index_params=index)
    client.insert(db.collection, [{"id": 5, "ref": "a.png", "vector": [0.6, 0.8], "generation": 2,
                                   "embedded_at": 7.0, "bucket": 5}])  # fmt: skip
    client.close()
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(db.uri)
    with pytest.raises(StoreError, match=r"no room for previous vectors .* `advbct index migrate --db "):
        db.open(dim=2)
    server_manager_instance.release_server(db.uri)
    migrated = run_advbct("index", "migrate", *db.args)
    assert migrated.returncode == 0 and json.loads(migrated.stdout) == {"migrated": 1}, migrated.stderr
    _one_line_error(run_advbct("index", "migrate", *db.args), "has room for previous vectors already")
    store = db.open(dim=2)
    row = store.get([5], with_vectors=True)[0]
    assert (row["ref"], row["generation"], row["previous_generation"], row["embedded_at"]) == ("a.png", 2, 0, 7.0)
    np.testing.assert_allclose(row["vector"], [0.6, 0.8], atol=1e-6)
    np.testing.assert_allclose(row["previous_vector"], [0.0, 0.0])
    store.close()


def _searches_sent(client) -> dict[str, float]:
    """The searches the service has sent to Milvus, by part of the gallery, from /metrics."""
    return {
        dict(labels)["part"]: value
        for (name, labels), value in _scrape(client).items()
        if name == "advbct_milvus_searches_total"
    }


def test_a_hit_through_a_kept_vector_reports_the_items_generation_and_the_one_that_matched(service, three_models):
    client, state, root = service
    assert client.post("/backfill/pause").status_code == 200  # the rollback's backfill must restore nothing yet
    partial = run_backfill(state.store, Embedder(three_models["new"]), 2, root, batch_size=5, limit=15)
    assert partial.done == 15
    moved = sorted(int(r["id"]) for r in state.store.get(list(range(40))) if r["generation"] == 2)
    query = (root / state.store.get([moved[0]])[0]["ref"]).read_bytes()

    def search() -> dict:
        return client.post("/search", files={"image": ("q.png", query)}, data={"k": "40"}).json()

    before = _searches_sent(client)  # generation 2 active: no item keeps a vector of it, its kept part is skipped
    assert search()["active"] == 2
    assert _searches_sent(client) == {"cross": before.get("cross", 0) + 1, "current": before.get("current", 0) + 1}

    assert client.post("/models/rollback").json() == {"active": 1}
    before = _searches_sent(client)
    result = search()
    # Every item has a vector of generation 1 (current, or kept by the 15 re-embedded): no cross part.
    assert _searches_sent(client) == {"cross": before["cross"], "kept": 1, "current": before["current"] + 1}
    hits = result["hits"]
    assert result["active"] == 1 and sorted(h["id"] for h in hits) == list(range(40))
    assert (hits[0]["id"], hits[0]["generation"], hits[0]["matched_generation"]) == (moved[0], 2, 1)
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4), "the query's own image, through its kept vector"
    pairs = {h["id"]: (h["generation"], h["matched_generation"]) for h in hits}
    assert pairs == {i: (2, 1) if i in moved else (1, 1) for i in range(40)}

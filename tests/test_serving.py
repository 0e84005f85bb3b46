"""The gallery on a real Milvus Lite database, and where the ``gallery_db`` fixture is used also on a real Milvus
server (those runs are marked slow): storage rules, the compatibility gate, a backfill killed with SIGKILL and
restarted, searches during a backfill, rollback with part of the gallery re-embedded, and workers splitting the
gallery by id shard (as processes on the server)."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from contextlib import closing

import numpy as np
import pytest
import torch

from advbct.data.images import DataError
from advbct.serving.backfill import ImageRoot, run_backfill
from advbct.serving.gate import GateRefused
from advbct.serving.ledger import ItemLedger, open_counted_store
from advbct.serving.models import Embedder
from advbct.serving.registry import ModelRegistry
from advbct.serving.store import GalleryStore, Hit, MixedMerge, SearchParts, StoreError
from conftest import GalleryDb, build_gallery, write_image_folder


def train_files(root):
    return sorted((root / "train").rglob("*.png"))


def test_store_rules(gallery_db):
    store = gallery_db.open(dim=4)
    vectors = np.eye(4, dtype=np.float32) * 3
    store.add([1, 2, 3, 4], ["a", "b", "c", "d"], vectors, generation=1)
    with pytest.raises(StoreError, match=r"ids already in the gallery: \[2\]"):
        store.add([5, 2], ["e", "b"], vectors[:2], generation=1)
    assert store.count() == 4 and store.existing([5]) == set(), "a refused request changes nothing"
    with pytest.raises(StoreError, match="repeats an id"):
        store.add([7, 7], ["x", "y"], vectors[:2], generation=1)
    with pytest.raises(StoreError, match=r"vectors must be \(n, 4\)"):
        store.add([9], ["z"], np.ones((1, 3)), generation=1)
    hits = store.search(np.array([[0, 0, 2.0, 0]]), k=2)[0]
    assert hits[0].id == 3 and hits[0].score == pytest.approx(1.0) and hits[0].generation == 1
    with pytest.raises(StoreError, match=r"unknown ids: \[42\]"):
        store.delete([42])
    store.delete([4])
    assert store.count() == 3 and store.generations() == {1: 3}
    store.close()
    with pytest.raises(StoreError, match="holds 4-d vectors, not 8-d"):
        gallery_db.open(dim=8)
    with pytest.raises(StoreError, match="collection name 'my-gallery'"):
        GalleryStore(gallery_db.uri, 4, collection="my-gallery")


def test_a_mixed_gallery_is_merged_by_calibrated_score(gallery_db):
    # Items 0 (relevant, still the old generation's vector, cosine 0.5 to the query) and 1 (old, cosine 0) beside
    # item 2 (re-embedded, irrelevant, cosine 0.7). Raw cosine ranks 2, 0, 1. Calibrated, item 0's log-odds
    # 10 * 0.5 - 3 = 2 beat item 2's 10 * 0.7 - 8 = -1 and item 1's 10 * 0 - 3 = -3: 0, 2, 1.
    store = gallery_db.open(dim=2)
    store.add([0, 1], ["a", "b"], np.array([[0.5, np.sqrt(0.75)], [0.0, 1.0]], dtype=np.float32), generation=1)
    store.add([2], ["c"], np.array([[0.7, np.sqrt(0.51)]], dtype=np.float32), generation=2)
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    assert [h.id for h in store.search(query, k=3)[0]] == [2, 0, 1]
    merge = MixedMerge(active=2, same=(10.0, -8.0), cross=(10.0, -3.0))
    hits = store.search(query, k=3, merge=merge)[0]
    assert [h.id for h in hits] == [0, 2, 1]
    assert [h.relevance for h in hits] == pytest.approx([2.0, -1.0, -3.0], abs=1e-5)
    assert [h.score for h in hits] == pytest.approx([0.5, 0.7, 0.0], abs=1e-5), "score stays the cosine"
    assert [h.id for h in store.search(query, k=2, merge=merge)[0]] == [0, 2]
    store.close()


def test_an_item_found_in_both_parts_counts_once_as_the_active_generations():
    old = Hit(id=5, score=0.9, generation=1, matched_generation=1, ref="x")
    new = Hit(id=5, score=0.2, generation=2, matched_generation=2, ref="x")
    merge = MixedMerge(active=2, same=(1.0, 0.0), cross=(1.0, 0.0))
    assert merge.rank([new], [old], k=10) == [Hit(5, 0.2, 2, 2, "x", relevance=0.2)]


def test_gate_refuses_an_incompatible_model_and_changes_nothing(three_models, image_root, tmp_path):
    registry = ModelRegistry(tmp_path / "registry.sqlite")
    registry.register_first(three_models["old"])
    before = registry.generations
    validation = write_image_folder(tmp_path / "validation", classes=10, train_per_class=0, test_per_class=10) / "test"
    with pytest.raises(GateRefused, match=r"fails the compatibility gate .* M\(n,o\) \d+\.\d+, M\(n,n\) .* M\(o,o\)"):
        registry.upgrade(three_models["new"], validation)
    assert ModelRegistry(tmp_path / "registry.sqlite").generations == before
    assert ModelRegistry(tmp_path / "registry.sqlite").active.number == 1


def _expected_vectors(model, image_root, files):
    return {str(f.relative_to(image_root)): v for f, v in zip(files, Embedder(model).embed_files(files), strict=True)}


def test_backfill_killed_mid_way_resumes_with_nothing_lost_or_doubled(three_models, image_root, tmp_path, gallery_db):
    registry = tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, gallery_db, registry)
    command = [sys.executable, "-m", "advbct", "backfill", *gallery_db.args, "--registry", str(registry),
               "--image-root", str(image_root), "--batch-size", "3"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    done = 0
    for line in process.stdout:
        if line.startswith("{") and '"done"' in line:
            done = json.loads(line)["done"]
            if done >= 9:
                break
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 9 <= done < 40, f"the backfill was killed mid-way ({done} of 40 re-embedded)"

    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert '"state": "finished"' in finished.stdout

    files = train_files(image_root)
    expected = _expected_vectors(three_models["new"], image_root, files)
    store = gallery_db.open(dim=next(iter(expected.values())).shape[0])
    assert store.count() == len(files) == 40
    rows = store.get(list(range(40)), with_vectors=True)
    assert sorted(int(r["id"]) for r in rows) == list(range(40)), "every item exactly once"
    for row in rows:
        assert row["generation"] == 2
        np.testing.assert_allclose(np.asarray(row["vector"]), expected[row["ref"]], atol=1e-5)


def test_searches_during_backfill_never_fail_or_miss_an_item(three_models, image_root, tmp_path, gallery_db):
    registry = tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, gallery_db, registry)
    models = ModelRegistry(registry)
    new = Embedder(models.active.path)
    store = gallery_db.open(new.dim)
    query = new.embed_files(train_files(image_root)[:1])
    stop = threading.Event()
    result = {}

    def backfill():
        # Pages of 6 items: the gallery is listed page by page while searches run and the count runs beside.
        result["progress"] = run_backfill(store, new, 2, image_root, batch_size=2, stop=stop, page_size=6)

    worker = threading.Thread(target=backfill)
    worker.start()
    searches, generations_seen = 0, set()
    while worker.is_alive() or searches < 3:
        hits = store.search(query, k=40)[0]
        assert sorted(h.id for h in hits) == list(range(40)), "a search during backfill missed an item"
        generations_seen |= {h.generation for h in hits}
        searches += 1
    worker.join()
    progress = result["progress"]
    assert progress.state == "finished" and progress.done == 40 and progress.remaining == 0
    assert store.generations() == {2: 40}
    assert searches > 3 and generations_seen == {1, 2}, "searches ran over the mixed gallery"


def test_a_re_embedding_keeps_the_previous_vector_searched_by_its_own_generation(gallery_db):
    # Items 0 [1, 0], 1 [0.6, 0.8] and 2 [0, 1] at generation 1; item 1 re-embedded at generation 2 as [-1, 0]
    # keeps [0.6, 0.8]. The query [1, 0] scores item 1 at 0.6 through its kept vector for generation 1, at -1
    # through its current one for generation 2 and for a plain search; it stays an item of generation 2 either way.
    store = gallery_db.open(dim=2)
    store.add([0, 1, 2], ["a", "b", "c"], np.array([[1, 0], [0.6, 0.8], [0, 1]], dtype=np.float32), generation=1)
    assert store.replace([1, 7], ["b", "gone"], np.array([[-1.0, 0.0], [1.0, 0.0]]), generation=2) == [1]
    assert store.replace([1], ["b"], np.array([[0.0, 1.0]]), generation=2) == [], "already at generation 2"
    query = np.array([[1.0, 0.0]], dtype=np.float32)

    def ranked(hits):
        return [(h.id, round(h.score, 5), h.generation, h.matched_generation) for h in hits]

    by_generation_1 = [(0, 1.0, 1, 1), (1, 0.6, 2, 1), (2, 0.0, 1, 1)]
    assert ranked(store.search(query, k=3, merge=MixedMerge(active=1))[0]) == by_generation_1
    by_current = [(0, 1.0, 1, 1), (2, 0.0, 1, 1), (1, -1.0, 2, 2)]
    assert ranked(store.search(query, k=3, merge=MixedMerge(active=2))[0]) == by_current
    assert ranked(store.search(query, k=3)[0]) == by_current
    assert ranked(store.search_generation(query, 3, 2)[0]) == [(1, -1.0, 2, 2)]

    assert store.restore([0, 1], generation=1) == [1], "item 0 kept no vector of generation 1 to restore"
    row = store.get([1], with_vectors=True)[0]
    assert (row["generation"], row["previous_generation"]) == (1, 2)
    np.testing.assert_allclose(row["vector"], [0.6, 0.8], atol=1e-6)
    np.testing.assert_allclose(row["previous_vector"], [-1.0, 0.0], atol=1e-6)
    assert store.get([0])[0]["previous_generation"] == 0, "an item never re-embedded keeps no vector"
    restored = [(0, 1.0, 1, 1), (2, 0.0, 1, 1), (1, -1.0, 1, 2)]
    assert ranked(store.search(query, k=3, merge=MixedMerge(active=2))[0]) == restored
    store.close()


def test_rollback_keeps_re_embedded_items_findable_and_a_roll_forward_swaps_them_back(
    three_models, image_root, tmp_path, gallery_db
):
    registry = tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, gallery_db, registry)
    models = ModelRegistry(registry)
    new = Embedder(three_models["new"])
    store = gallery_db.open(new.dim)
    # A backfill cut short at 15 items (a stop event is not exact: a server's writers may already hold the rest).
    run_backfill(store, new, 2, image_root, batch_size=5, limit=15)
    moved = sorted(int(r["id"]) for r in store.get(list(range(40))) if r["generation"] == 2)
    assert len(moved) == 15

    assert models.rollback().number == 1
    files = train_files(image_root)
    old_vectors = _expected_vectors(three_models["old"], image_root, files)
    new_vectors = _expected_vectors(three_models["new"], image_root, files)
    refs = {int(r["id"]): r["ref"] for r in store.get(list(range(40)))}
    queries = np.stack([old_vectors[refs[i]] for i in moved])
    for item, hits in zip(moved, store.search(queries, 40, models.active.mixed_merge()), strict=True):
        assert sorted(h.id for h in hits) == list(range(40)), "every item once, none missed"
        assert (hits[0].id, hits[0].generation, hits[0].matched_generation) == (item, 2, 1)
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)

    # The backfill back to generation 1 swaps the kept vectors in without embedding anything: handed the
    # independent model, it still leaves every item with generation 1's own vector.
    stranger = Embedder(three_models["independent"])
    back = run_backfill(store, stranger, 1, image_root, batch_size=8)
    assert back.state == "finished" and back.done == len(moved)
    for row in store.get(list(range(40)), with_vectors=True):
        assert row["generation"] == 1
        np.testing.assert_allclose(row["vector"], old_vectors[row["ref"]], atol=1e-5)
        if int(row["id"]) in moved:
            assert row["previous_generation"] == 2
            np.testing.assert_allclose(row["previous_vector"], new_vectors[row["ref"]], atol=1e-5)

    forward = models.upgrade(three_models["new"], image_root / "test", force=True, reason="roll forward")
    assert forward.number == 2 and len(models.generations) == 2, "the registered checkpoint, not a new generation"
    queries = np.stack([new_vectors[refs[i]] for i in moved])
    for item, hits in zip(moved, store.search(queries, 1, forward.mixed_merge()), strict=True):
        assert (hits[0].id, hits[0].generation, hits[0].matched_generation) == (item, 1, 2)
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    again = run_backfill(store, new, 2, image_root, batch_size=8)
    assert again.state == "finished" and again.done == 40
    for row in store.get(list(range(40)), with_vectors=True):
        assert (row["generation"], row["previous_generation"]) == (2, 1)
        np.testing.assert_allclose(row["vector"], new_vectors[row["ref"]], atol=1e-5)
        np.testing.assert_allclose(row["previous_vector"], old_vectors[row["ref"]], atol=1e-5)
    assert models.rollback().number == 1
    with pytest.raises(GateRefused, match="no earlier generation"):
        models.rollback()
    store.close()


@pytest.mark.parametrize("gallery_db", ["lite"], indirect=True)  # the same logic as on a server
def test_two_workers_split_the_gallery_by_id_bucket(three_models, image_root, tmp_path, gallery_db):
    registry = tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, gallery_db, registry)
    new = Embedder(ModelRegistry(registry).active.path)
    store = gallery_db.open(new.dim)
    batches: list[list[int]] = []
    original_replace = store.replace

    def recording_replace(ids, *args, **kwargs):
        batches.append(list(ids))
        return original_replace(ids, *args, **kwargs)

    store.replace = recording_replace
    threads = [
        threading.Thread(target=run_backfill, args=(store, new, 2, image_root, 4), kwargs={"worker": w, "workers": 2})
        for w in (0, 1)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.generations() == {2: 40}
    written = [i for batch in batches for i in batch]
    assert sorted(written) == list(range(40)), "each item re-embedded exactly once across the two workers"
    assert all(len({i % 64 % 2 for i in batch}) == 1 for batch in batches), "a batch stays inside one shard"


@pytest.mark.parametrize("writers", [1, 4])
@pytest.mark.parametrize("gallery_db", ["lite"], indirect=True)
def test_items_already_at_the_target_are_neither_rewritten_nor_counted(
    three_models, image_root, tmp_path, gallery_db, writers
):
    """Items that reach the target generation after the backfill listed them (a stale listing, another writer)
    are skipped at write time, so `done` counts each item once and their vectors stay as they are; also with the
    several writer threads a server gets."""
    registry = tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, gallery_db, registry)
    new = Embedder(ModelRegistry(registry).active.path)
    store = gallery_db.open(new.dim)
    store.concurrent_writes = writers
    marker = np.eye(new.dim, dtype=np.float32)[:1]
    behind_its_back: list[int] = []

    def rewrite_three_later_items(progress):
        # The last three of the listing: their batch is not checked yet, even with four writers ahead of it.
        if not behind_its_back:
            behind_its_back.extend(int(r["id"]) for r in store.stale(2, 1000)[-3:])
            store.replace(behind_its_back, ["elsewhere"] * 3, np.repeat(marker, 3, axis=0), generation=2)

    progress = run_backfill(store, new, 2, image_root, batch_size=4, on_batch=rewrite_three_later_items)
    assert progress.state == "finished" and progress.done == 40 - 3
    assert store.generations() == {2: 40}
    for row in store.get(behind_its_back, with_vectors=True):
        assert row["ref"] == "elsewhere"
        np.testing.assert_allclose(np.asarray(row["vector"]), marker[0], atol=1e-6)


@pytest.mark.parametrize("gallery_db", [pytest.param("server", marks=pytest.mark.slow)], indirect=True)
def test_worker_processes_split_a_server_gallery(three_models, image_root, tmp_path, gallery_db):
    """Two `advbct backfill` processes on the two shards of one gallery at once. This needs a Milvus server: a
    Milvus Lite file can be opened by one process only, so there workers can only be threads."""
    registry = tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, gallery_db, registry)
    command = [sys.executable, "-m", "advbct", "backfill", *gallery_db.args, "--registry", str(registry),
               "--image-root", str(image_root), "--batch-size", "3", "--workers", "2"]  # fmt: skip
    processes = [subprocess.Popen([*command, "--worker", str(w)], stdout=subprocess.PIPE, text=True) for w in (0, 1)]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    finals = [json.loads(next(line for line in out.splitlines() if line.startswith('{"state"'))) for out in outputs]
    assert [f["state"] for f in finals] == ["finished", "finished"]
    assert sum(f["done"] for f in finals) == 40 and min(f["done"] for f in finals) > 0, "each item written once"

    expected = _expected_vectors(three_models["new"], image_root, train_files(image_root))
    store = gallery_db.open(dim=next(iter(expected.values())).shape[0])
    assert store.generations() == {2: 40}
    for row in store.get(list(range(40)), with_vectors=True):
        np.testing.assert_allclose(np.asarray(row["vector"]), expected[row["ref"]], atol=1e-5)


def test_image_root_refuses_every_way_out_and_agrees_with_a_full_resolve(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "b" / "x.png").write_bytes(b"x")
    (outside / "secret.png").write_bytes(b"s")
    (root / "a" / "out.png").symlink_to(outside / "secret.png")  # a file link leading out
    (root / "a" / "outdir").symlink_to(outside)  # a folder link leading out
    (root / "a" / "in.png").symlink_to(root / "a" / "b" / "x.png")  # a link that stays inside
    images = ImageRoot(root)
    for ref in ("a/b/x.png", "a/in.png", "a/b/../b/x.png", "a/b"):
        assert images.resolve(ref) == (root / ref).resolve(), ref
    for ref in ("../outside/secret.png", "a/out.png", "a/outdir/secret.png", "/etc/passwd", "a/b/../../.."):
        with pytest.raises(DataError, match="points outside the image root"):
            images.resolve(ref)
    assert images.resolve("a/b/x.png") == images.resolve("a/b/x.png")  # a cached folder answers the same


def test_a_shared_embedder_is_never_converted_again_while_it_serves(three_models, image_root, monkeypatch):
    # The search batcher and the backfill run one Embedder's model from two threads. Converting a module (.to,
    # in place) rewrites every parameter's storage and strides, which a forward pass in the other thread may read
    # half done; so the model takes its final form when the Embedder is built, and no call converts it after.
    embedder = Embedder(three_models["new"])
    files = sorted((image_root / "train").rglob("*.png"))[:6]
    size = embedder.prep.image_size
    arrays = np.random.default_rng(0).integers(0, 256, (6, size, size, 3), dtype=np.uint8)
    expected_files, expected_arrays = embedder.embed_files(files), embedder.embed_arrays(arrays)

    def refuse(module, *args, **kwargs):
        raise AssertionError(f"{type(module).__name__} converted while shared")

    monkeypatch.setattr(torch.nn.Module, "_apply", refuse)
    np.testing.assert_array_equal(embedder.embed_files(files), expected_files)
    np.testing.assert_array_equal(embedder.embed_arrays(arrays), expected_arrays)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in embedder.model.parameters() if p.ndim == 4)


def test_an_ordered_backfill_re_embeds_the_order_first_and_stops_at_its_limit(
    three_models, image_root, tmp_path, gallery_db
):
    registry = tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, gallery_db, registry)
    new = Embedder(ModelRegistry(registry).active.path)
    store = gallery_db.open(new.dim)
    order = [int(i) for i in torch.randperm(40, generator=torch.Generator().manual_seed(5))]
    first = run_backfill(store, new, 2, image_root, batch_size=4, order=order, limit=10)
    assert first.state == "stopped" and first.done == 10 and first.remaining == 30
    at_target = {int(r["id"]) for r in store.get(list(range(40))) if r["generation"] == 2}
    assert at_target == set(order[:10]), "exactly the first ten of the order"
    rest = run_backfill(store, new, 2, image_root, batch_size=4, order=order)
    assert rest.state == "finished" and rest.done == 30, "the first ten are passed over, not re-embedded"
    assert store.generations() == {2: 40}


def _seeded_permutation(n):
    return torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()


def _old_checkpoint_with_known_head(source, folder, head):
    """A copy of ``source`` whose classifier is ``head`` (classes x dim), for orders computed by hand."""
    from advbct.models.checkpoint import read_checkpoint, read_meta

    blob = read_checkpoint(source)
    meta = read_meta(blob, source)
    meta.head_classes = list(range(head.shape[0]))
    blob["meta"], blob["model"]["head.weight"] = meta.model_dump_json(), head
    folder.mkdir(parents=True)
    torch.save(blob, folder / "model.pt")
    return folder / "model.pt", meta.model_id


def test_each_service_order_by_hand(three_models, tmp_path):
    from advbct.compat.statistics import ClassStatistics, save_statistics
    from advbct.serving.orders import BackfillOrders, check_inputs, check_order, compute_order

    dim = Embedder(three_models["old"]).dim
    e1, e2, e3 = np.eye(dim, dtype=np.float32)[:3]
    # Items 0..4 stale (generation 1), item 5 already at the target (generation 2): never ordered.
    vectors = np.stack([e1, (e1 + e2) / np.sqrt(2), e2, e3, 0.6 * e1 + 0.8 * e3, e1])
    store = GalleryStore(str(tmp_path / "gallery.db"), dim)
    store.add([0, 1, 2, 3, 4], list("abcde"), vectors[:5], generation=1)
    store.add([5], ["f"], vectors[5:], generation=2)
    # The old classifier: logits 4 * (v.e1, v.e2, -v.e1, -v.e2). Softmax entropies by hand: item 3 (all logits 0)
    # ln 4 = 1.386; item 1 (+-2.83, two classes at p 0.498) 0.716; item 4 (2.4, 0, -2.4, 0: p 0.841, 0.076,
    # 0.007, 0.076) 0.573; items 0 and 2 (4, 0, -4, 0 and its rotation) 0.180 each, tied: id order.
    head = 4 * torch.from_numpy(np.stack([e1, e2, -e1, -e2]))
    path, model_id = _old_checkpoint_with_known_head(three_models["old"], tmp_path / "old", head)
    registry = ModelRegistry(tmp_path / "registry.sqlite")
    old = registry.register_first(path)
    assert compute_order("uncertainty", store, 2, old) == [3, 1, 4, 0, 2]

    # Centres e1 and e2. Distance to the nearest: item 3 sqrt(2) = 1.414; item 4 sqrt(2 - 2 * 0.6) = 0.894;
    # item 1 sqrt(2 - sqrt(2)) = 0.765; items 0 and 2 on a centre, 0: id order.
    with pytest.raises(DataError, match=r"needs the old class centres .* run `advbct stats --old .*model.pt`"):
        check_inputs("centre-distance", old)
    zeros = torch.zeros(2)
    stats = ClassStatistics(torch.from_numpy(np.stack([e1, e2])), zeros, zeros, zeros, zeros, torch.ones(2).long(),
                            torch.ones(2, dtype=torch.bool), model_id, ("a", "b"))  # fmt: skip
    save_statistics(stats, tmp_path / "old" / "stats.pt")
    check_inputs("centre-distance", old)
    assert compute_order("centre-distance", store, 2, old) == [3, 4, 1, 0, 2]

    # Seeded random: the permutation torch draws with seed 0, over the stale ids in id order.
    assert (
        compute_order("random", store, 2, old) == torch.randperm(5, generator=torch.Generator().manual_seed(0)).tolist()
    )

    # Traffic: items 1 and 4 returned 3 times (tied: id order), item 2 once, 0 and 3 never (id order); item 7 is
    # not stored and item 5 not stale.
    hits = (np.array([1, 2, 4, 5, 7]), np.array([3, 1, 3, 9, 5]))
    assert compute_order("traffic", store, 2, old, traffic=hits) == [1, 4, 2, 0, 3]

    plan = BackfillOrders(registry, "gallery").plan(2, None)
    assert (plan.policy, plan.ids) == ("storage", None), "storage order: the store's own listing, nothing saved"
    assert store.stale_items(2)[0].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match=r"'oracle' is refused in the service: it needs every item's new embedding"):
        check_order("oracle")
    with pytest.raises(DataError, match=r"unknown backfill order 'fastest'; choose one of storage, random, "):
        check_order("fastest")
    store.close()


def test_a_saved_order_survives_kill_9_and_is_kept_by_a_restart_without_order(three_models, image_root, tmp_path):
    from advbct.serving.orders import BackfillOrders

    registry = tmp_path / "registry.sqlite"
    db = GalleryDb(str(tmp_path / "gallery.db"))
    build_gallery(three_models, image_root, db, registry)
    command = [sys.executable, "-m", "advbct", "backfill", *db.args, "--registry", str(registry),
               "--image-root", str(image_root), "--batch-size", "8"]  # fmt: skip
    process = subprocess.Popen([*command, "--order", "random"], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    done = 0
    for line in process.stdout:
        if line.startswith("{") and '"done"' in line:
            done = json.loads(line)["done"]
            break
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 8 <= done < 40, f"the backfill was killed mid-way ({done} of 40 re-embedded)"

    orders = BackfillOrders(ModelRegistry(registry), "gallery")
    saved = orders.saved(2)
    # All 40 items (ids 0..39) were stale when it started: the seed-0 permutation of them.
    assert (
        saved.policy == "random"
        and saved.ids == torch.randperm(40, generator=torch.Generator().manual_seed(0)).tolist()
    )

    other = subprocess.run([*command, "--order", "uncertainty"], capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "keeps the 'random' order it started with" in other.stderr
    assert "Traceback" not in other.stderr and len(other.stderr.strip().splitlines()) == 1
    assert orders.saved(2) == saved, "a refused start changes nothing"

    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    summary = json.loads(finished.stdout.strip().splitlines()[-1])
    assert summary["state"] == "finished" and summary["order"] == "random"
    assert orders.saved(2) is None, "a finished backfill's order is dropped"

    store = db.open(Embedder(three_models["new"]).dim)
    embedded_at = {int(r["id"]): r["embedded_at"] for r in store.get(list(range(40)))}
    times = [embedded_at[i] for i in saved.ids]
    assert times == sorted(times), "before and after the kill, items were re-embedded in the saved order"
    assert store.generations() == {2: 40}
    store.close()


def _ranked(hits):
    return [(h.id, round(h.score, 5), h.generation, h.matched_generation) for h in hits]


def test_a_merged_search_skips_the_parts_no_item_is_in_and_answers_the_same(gallery_db, tmp_path):
    # Items 0 [1, 0], 1 [0.6, 0.8] and 2 [0, 1] at generation 1; the query [1, 0]. A store with a ledger counts
    # the searches it sends by part; one without a ledger on the same collection knows no counts and runs every
    # part, as every search did before counts were kept: it is the reference the answers must equal.
    sent: list[str] = []
    ledger = ItemLedger(ModelRegistry(tmp_path / "registry.sqlite"), gallery_db.collection)
    store = GalleryStore(gallery_db.uri, 2, gallery_db.collection, ledger=ledger, on_search=sent.append)
    ledger.check(store)
    unshortened = gallery_db.open(dim=2)
    store.add([0, 1, 2], ["a", "b", "c"], np.array([[1, 0], [0.6, 0.8], [0, 1]], dtype=np.float32), generation=1)
    query = np.array([[1.0, 0.0]], dtype=np.float32)

    def searched(active, expected, parts):
        sent.clear()
        hits = store.search(query, k=3, merge=MixedMerge(active=active))[0]
        assert (_ranked(hits), Counter(sent)) == (expected, parts)
        assert _ranked(unshortened.search(query, k=3, merge=MixedMerge(active=active))[0]) == expected

    one_generation = [(0, 1.0, 1, 1), (1, 0.6, 1, 1), (2, 0.0, 1, 1)]
    searched(1, one_generation, {"plain": 1})
    # Item 1 re-embedded at generation 2 as [-1, 0]: generation 2's queries find items 0 and 2 through their
    # generation-1 vectors and item 1 through its own; no item keeps a vector of generation 2.
    store.replace([1], ["b"], np.array([[-1.0, 0.0]]), generation=2)
    searched(2, [(0, 1.0, 1, 1), (2, 0.0, 1, 1), (1, -1.0, 2, 2)], {"cross": 1, "current": 1})
    # Rolled back to generation 1: item 1 answers through the vector it kept; every item has one of generation 1.
    searched(1, [(0, 1.0, 1, 1), (1, 0.6, 2, 1), (2, 0.0, 1, 1)], {"kept": 1, "current": 1})
    assert ledger.kept_counts() == {1: 1} == store.generations("previous_generation")

    # A write of another generation than the active one, journalled and not settled, may be adding kept vectors
    # of the active generation: the parts it could touch are searched until it settles.
    token = ledger.begin([0], 2)
    searched(1, [(0, 1.0, 1, 1), (1, 0.6, 2, 1), (2, 0.0, 1, 1)], {"cross": 1, "kept": 1, "current": 1})
    ledger.settle(token, {0: (1, 0)})

    # Restored: every item at generation 1 again, one plain search; generation 2 reaches item 1's kept vector.
    assert store.restore([1], generation=1) == [1]
    searched(1, one_generation, {"plain": 1})
    searched(2, [(0, 1.0, 1, 1), (2, 0.0, 1, 1), (1, -1.0, 1, 2)], {"cross": 1, "kept": 1, "current": 1})
    assert ledger.kept_counts() == {2: 1} == store.generations("previous_generation")
    unshortened.close()
    store.close()


class DeletingDuringWrite(GalleryStore):
    """The real store, with another thread deleting ``victim`` right after a write has read the stored rows:
    the interleaving that would resurrect the item if the write's read and upsert were not under one lock."""

    victim: int | None = None
    deleter: threading.Thread

    def get(self, ids, with_vectors=False):
        rows = super().get(ids, with_vectors)
        if with_vectors and self.victim is not None:  # the read replace and restore compute their upsert from
            self.deleter = threading.Thread(target=self.delete, args=([self.victim],))
            self.deleter.start()
            self.deleter.join(timeout=1.0)  # it lands now unless the write holds the lock; then after the upsert
        return rows


@pytest.mark.parametrize("gallery_db", ["lite"], indirect=True)  # a server takes no lock: see GalleryStore.replace
@pytest.mark.parametrize("write", ["replace", "restore"])
def test_a_delete_racing_a_re_embedding_never_brings_the_item_back(gallery_db, tmp_path, write):
    ledger = ItemLedger(ModelRegistry(tmp_path / "registry.sqlite"), gallery_db.collection)
    store = DeletingDuringWrite(gallery_db.uri, 2, gallery_db.collection, ledger=ledger)
    ledger.check(store)
    store.add([0, 1], ["a", "b"], np.array([[1, 0], [0, 1]], dtype=np.float32), generation=1)
    store.replace([0, 1], ["a", "b"], np.array([[0.0, 1.0], [1.0, 0.0]]), generation=2)
    store.victim = 1
    if write == "replace":
        assert store.replace([1], ["b"], np.array([[0.6, 0.8]]), generation=3) == [1]
    else:
        assert store.restore([1], generation=1) == [1]
    store.deleter.join()
    assert store.get([1]) == [] and store.existing([0, 1]) == {0}
    assert ledger.counts() == store.generations() == {2: 1}
    store.close()


def test_a_ledger_made_before_kept_generations_were_mirrored_is_rebuilt_when_opened(tmp_path):
    db, registry = GalleryDb(str(tmp_path / "gallery.db")), ModelRegistry(tmp_path / "registry.sqlite")
    store = open_counted_store(registry, db.uri, 2)
    store.add([0, 1, 2], ["a", "b", "c"], np.array([[1, 0], [0.6, 0.8], [0, 1]], dtype=np.float32), generation=1)
    store.replace([1], ["b"], np.array([[-1.0, 0.0]]), generation=2)
    store.close()
    with closing(sqlite3.connect(registry.path)) as sql, sql:  # the ledger's tables as they were before
        for trigger in ("kept_added", "kept_removed", "kept_moved"):
            sql.execute(f"DROP TRIGGER {trigger}")
        sql.execute("DROP TABLE kept_counts")
        sql.execute("ALTER TABLE items DROP COLUMN previous_generation")
        sql.execute("ALTER TABLE pending_writes DROP COLUMN generation")

    ledger = ItemLedger(registry, db.collection)
    assert ledger.search_parts(1) == SearchParts(cross=True, kept=True), "kept generations unknown: search all"
    store = open_counted_store(registry, db.uri, 2)
    assert store.ledger.last_reconciliation().reason == "the mirror extended with each item's kept generation"
    assert store.ledger.counts() == {1: 2, 2: 1} and store.ledger.kept_counts() == {1: 1}
    assert store.ledger.search_parts(1) == SearchParts(cross=False, kept=True)
    assert store.ledger.search_parts(2) == SearchParts(cross=True, kept=False)
    store.close()

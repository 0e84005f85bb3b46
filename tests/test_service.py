"""The HTTP service on a real uvicorn server on localhost over a real Milvus Lite gallery."""

import base64
import io
import json
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import websocket
from PIL import Image

from advbct.pipeline import train_old
from advbct.presets import train_config


def _png(source) -> bytes:
    """PNG bytes of an image file or a uint8 array."""
    buffer = io.BytesIO()
    image = Image.fromarray(source) if isinstance(source, np.ndarray) else Image.open(source)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_search_add_delete_and_the_page(service):
    client, _, root = service
    assert client.get("/health").json() == {"status": "ok", "items": 40, "active": 2}
    query = sorted((root / "train").rglob("*.png"))[0]
    result = client.post("/search", files={"image": ("q.png", query.read_bytes())}, data={"k": "5"}).json()
    assert result["active"] == 2 and len(result["hits"]) == 5
    assert {h["generation"] for h in result["hits"]} <= {1, 2}

    added = client.post("/items", files={"image": ("new.png", _png(query))}).json()["ids"]
    assert added == [40]
    top = client.post("/search", files={"image": ("q.png", query.read_bytes())}, data={"k": "1"}).json()["hits"][0]
    assert top["id"] in (0, 40) and top["score"] == pytest.approx(1.0, abs=1e-4)
    image = client.get("/items/40/image")
    assert image.status_code == 200 and image.content == _png(query)
    assert client.delete("/items/40").status_code == 200
    assert client.get("/health").json()["items"] == 40

    page = client.get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text and "/backfill" in page.text


def test_bad_input_gets_a_4xx_and_changes_nothing(service, tmp_path):
    client, _, root = service
    not_image = client.post("/search", files={"image": ("x.png", b"this is not an image")})
    assert not_image.status_code == 400 and "not a readable image" in not_image.json()["detail"]
    noise = np.random.default_rng(0).integers(0, 256, size=(200, 200, 3), dtype=np.uint8)
    big = client.post("/items", files={"image": ("big.png", _png(noise))})
    assert big.status_code == 413 and "limit" in big.json()["detail"]
    outside = client.post("/items/by-path", json={"paths": ["../../etc/passwd"]})
    assert outside.status_code == 400 and "outside the image root" in outside.json()["detail"]
    assert client.delete("/items/999").status_code == 404
    assert client.get("/items/999/image").status_code == 404
    assert client.post("/search", files={"image": ("q.png", b"x")}, data={"k": "0"}).status_code == 400

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    junk = client.post("/models", json={"path": str(tmp_path / "junk.pt"), "validation": str(root / "test")})
    assert junk.status_code == 422
    cfg = train_config("old", "smoke", None, ["data.dataset=image-folder", "device=cpu", "optim.epochs=1",
                                              "model.embedding_dim=16"], str(root), None)  # fmt: skip
    narrow = train_old(cfg, tmp_path / "narrow", show_progress=False)
    wrong_dim = client.post("/models", json={"path": str(narrow), "validation": str(root / "test")})
    assert wrong_dim.status_code == 422 and "16 dimensions" in wrong_dim.json()["detail"]

    health = client.get("/health").json()
    assert health == {"status": "ok", "items": 40, "active": 2}
    assert len(client.get("/models").json()["generations"]) == 2


def test_backfill_through_the_api_while_searches_are_batched(service):
    client, state, root = service
    files = sorted((root / "train").rglob("*.png"))
    assert client.post("/backfill/start").json()["state"] in ("ordering", "running", "finished", "idle")

    def search(path):
        response = client.post("/search", files={"image": (path.name, path.read_bytes())}, data={"k": "40"})
        response.raise_for_status()
        return response.json()["hits"]

    batches_before = state.batcher.batches
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(search, files[:32]))
    assert all(sorted(h["id"] for h in hits) == list(range(40)) for hits in results)
    assert state.batcher.batches - batches_before < 32, "concurrent queries share model calls"

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = client.get("/backfill").json()
        if status["state"] in ("finished", "failed"):
            break
        time.sleep(0.2)
    assert status["state"] == "finished" and status["by_generation"] == {"2": 40} and status["remaining"] == 0, status
    rolled = client.post("/models/rollback").json()
    assert rolled == {"active": 1}
    assert client.post("/models/rollback").status_code == 409


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """The smallest Chrome DevTools Protocol client: numbered commands over the page's websocket."""

    def __init__(self, ws_url: str):
        self.socket = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0

    def __call__(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)["result"].get(
            "value"
        )

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("headless Chromium not found (Debian: apt-get install chromium)")
    profile = tmp_path / "chromium-profile"
    process = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            assert time.monotonic() < deadline and process.poll() is None, "Chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(p for p in pages if p["type"] == "page")
        yield DevTools(page["webSocketDebuggerUrl"])
    finally:
        process.kill()
        process.wait()


def test_web_page_upload_shows_results_in_headless_chromium(service, browser, tmp_path):
    client, _, root = service
    query = sorted((root / "train").rglob("*.png"))[5]
    browser("Page.enable")
    browser("Page.navigate", url=str(client.base_url) + "/")
    browser.wait_for("document.readyState === 'complete' && document.getElementById('active').textContent !== '?'")
    assert browser.evaluate("document.getElementById('active').textContent") == "2"
    document = browser("DOM.getDocument")
    node = browser("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#query")["nodeId"]
    browser("DOM.setFileInputFiles", files=[str(query)], nodeId=node)
    browser.evaluate("document.getElementById('search-form').requestSubmit()")
    browser.wait_for("document.querySelectorAll('figure.hit').length === 12")
    captions = browser.evaluate("[...document.querySelectorAll('figure.hit figcaption')].map(e => e.textContent)")
    assert len(captions) == 12
    assert all(re.fullmatch(r"#\d+ · [01]\.\d{3} · gen [12]", caption) for caption in captions), captions
    browser.wait_for("[...document.querySelectorAll('figure.hit img')].every(i => i.complete && i.naturalWidth > 0)")
    expected = client.post("/search", files={"image": ("q.png", query.read_bytes())}, data={"k": "12"}).json()
    assert [c.split(" ")[0] for c in captions] == [f"#{h['id']}" for h in expected["hits"]]
    # The live watch's curve (drawn from GET /backfill's "watch" where the server has a probe): hand-worked
    # coordinates for two points over a 40-item gallery. x = 10 + 460 done / 40; the top is 1.1 x the largest score
    # (0.66) and y = 130 - 120 score / 0.66: (10, 57.3) and (240, 20.9), the threshold 0.5 at y = 39.1.
    watch = {"metric": "precision@10", "threshold": 0.5, "paused_because": "below the threshold",
             "points": [{"done": 0, "score": 0.4}, {"done": 20, "score": 0.6}]}  # fmt: skip
    browser.evaluate(f"drawWatch({json.dumps(watch)}, 40)")
    assert browser.evaluate("document.getElementById('watch').hidden") is False
    points = browser.evaluate("document.querySelector('#watch-plot polyline').getAttribute('points')")
    assert points == "10.0,57.3 240.0,20.9"
    limit = float(browser.evaluate("document.querySelector('#watch-plot line').getAttribute('y1')"))
    assert limit == pytest.approx(130 - 120 * 0.5 / 0.66, abs=1e-6)
    text = browser.evaluate("document.getElementById('watch-text').textContent")
    assert text == "0.600 at 20 re-embedded; threshold 0.500; paused: below the threshold"
    shot = browser("Page.captureScreenshot", format="png")["data"]
    (tmp_path / "page.png").write_bytes(base64.b64decode(shot))
    assert (tmp_path / "page.png").stat().st_size > 1000


def _wait_for_backfill(client, states=("finished", "failed"), timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get("/backfill").json()
        if status["state"] in states:
            return status
        time.sleep(0.1)
    raise AssertionError(f"the backfill stayed {status['state']}")


def test_traffic_order_follows_the_hits_of_real_searches(service):
    from advbct.serving.traffic import SearchTraffic

    client, state, root = service
    queries = sorted((root / "train").rglob("*.png"))
    counts = {}
    # The last class's image three times: its neighbours lead the traffic order, whatever the tiny model learnt.
    for path in [queries[38], queries[38], queries[38], queries[0], queries[12]]:
        hits = client.post("/search", files={"image": (path.name, path.read_bytes())}, data={"k": "3"}).json()["hits"]
        for hit in hits:
            counts[hit["id"]] = counts.get(hit["id"], 0) + 1
    # Every item is stale (generation 1): most-returned first, ties and never-returned items by id.
    expected = sorted(range(40), key=lambda i: (-counts.get(i, 0), i))
    assert expected[:2] != [0, 1] or counts.get(0) != counts.get(1), "the searches must reorder the gallery"

    started = client.post("/backfill/start", json={"order": "traffic"})
    assert started.status_code == 200 and started.json()["order"] == "traffic"
    saved = SearchTraffic.load(state.registry, "gallery").counts()
    assert dict(zip(saved[0].tolist(), saved[1].tolist(), strict=True)) == counts, "saved at the backfill's start"
    status = _wait_for_backfill(client)
    assert status["state"] == "finished" and status["order"] == "traffic", status
    embedded_at = {int(r["id"]): r["embedded_at"] for r in state.store.get(list(range(40)))}
    times = [embedded_at[i] for i in expected]
    assert times == sorted(times), "re-embedded most-returned first"


def test_backfill_orders_refused_over_http_say_why(service):
    client, state, _ = service
    for body, status, message in [
        ({"order": "oracle"}, 400, "offline only"),
        ({"order": "fastest"}, 400, "choose one of storage, random, uncertainty, centre-distance, traffic"),
        ({"order": "centre-distance"}, 400, "run `advbct stats --old"),
        ({"restart_order": True}, 400, "needs the order to start again with"),
    ]:
        response = client.post("/backfill/start", json=body)
        assert response.status_code == status and message in response.json()["detail"], response.json()
    assert client.get("/backfill").json()["state"] == "idle", "nothing started"

    state.start_backfill(paused=True, order="random")
    _wait_for_backfill(client, states=("paused",))
    assert state.orders.saved(2).policy == "random"
    conflict = client.post("/backfill/start", json={"order": "uncertainty"})
    assert conflict.status_code == 409 and "running in the 'random' order" in conflict.json()["detail"]
    assert client.get("/backfill").json()["state"] == "paused", "a refused start changes nothing"
    assert client.post("/backfill/start", json={"order": "random"}).json()["order"] == "random", "the same: resumes"
    client.post("/backfill/pause")
    replaced = client.post("/backfill/start", json={"order": "uncertainty", "restart_order": True})
    assert replaced.status_code == 200 and replaced.json()["order"] == "uncertainty"
    status = _wait_for_backfill(client)
    assert status["state"] == "finished" and status["by_generation"] == {"2": 40}
    state.backfill_thread.join(timeout=30)  # the order is dropped by the backfill's thread after its last write
    assert state.orders.saved(2) is None


def _precision_at_10(queries, gallery, query_labels, gallery_labels):
    top = np.argsort(-(queries @ gallery.T), axis=1)[:, :10]
    return float((gallery_labels[top] == query_labels[:, None]).mean())


def test_the_live_watch_pauses_a_backfill_behind_an_incompatible_model(three_models, image_root, tmp_path):
    from advbct.serving.api import ServiceConfig
    from advbct.serving.models import Embedder
    from advbct.serving.watch import WatchConfig
    from conftest import GalleryDb, build_gallery, serving

    db, registry = GalleryDb(str(tmp_path / "gallery.db")), tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, db, registry)  # the "new" model forced past the gate as generation 2
    # Hand-computed with numpy: precision@10 of the held-out test images against the 40 training images, each
    # labelled by its class folder; the old model on its own gallery (the threshold) and the new one against it.
    probe, gallery = sorted((image_root / "test").rglob("*.png")), sorted((image_root / "train").rglob("*.png"))
    probe_labels = np.array([p.parent.name for p in probe])
    gallery_labels = np.array([p.parent.name for p in gallery])
    old, new = Embedder(three_models["old"]), Embedder(three_models["new"])
    threshold = _precision_at_10(old.embed_files(probe), old.embed_files(gallery), probe_labels, gallery_labels)
    served = _precision_at_10(new.embed_files(probe), old.embed_files(gallery), probe_labels, gallery_labels)
    assert served < threshold, "the forced model serves worse than the old one"

    watch = WatchConfig(image_root / "test", every=8)
    config = ServiceConfig(db.uri, registry, image_root, backfill_batch=4, watch=watch)
    with serving(config) as (client, state, _):
        state.start_backfill()
        status = _wait_for_backfill(client, states=("paused", "finished", "failed"))
        assert status["state"] == "paused", status
        assert status["by_generation"] == {"1": 40}, "paused before any item was re-embedded"
        watched = status["watch"]
        assert watched["metric"] == "precision@10" and watched["threshold"] == pytest.approx(threshold)
        assert [p["done"] for p in watched["points"]] == [0]
        assert watched["points"][0]["score"] == pytest.approx(served)
        reason = watched["paused_because"]
        assert f"fell to {served:.3f} after 0 items" in reason and f"below the threshold {threshold:.3f}" in reason
        assert client.post("/backfill/stop").json()["state"] == "stopped"


def test_the_live_watch_scores_the_served_gallery_every_n_items(three_models, image_root, tmp_path):
    from advbct.serving.api import ServiceConfig
    from advbct.serving.models import Embedder
    from advbct.serving.watch import WatchConfig
    from conftest import GalleryDb, build_gallery, serving

    db, registry = GalleryDb(str(tmp_path / "gallery.db")), tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, db, registry)
    probe, gallery = sorted((image_root / "test").rglob("*.png")), sorted((image_root / "train").rglob("*.png"))
    new = Embedder(three_models["new"])
    labels = np.array([p.parent.name for p in probe]), np.array([p.parent.name for p in gallery])
    at_the_end = _precision_at_10(new.embed_files(probe), new.embed_files(gallery), *labels)

    watch = WatchConfig(image_root / "test", every=8, threshold=0.0)  # an operator's threshold: never pauses
    config = ServiceConfig(db.uri, registry, image_root, backfill_batch=4, watch=watch)
    with serving(config) as (client, state, _):
        state.start_backfill()
        status = _wait_for_backfill(client)
        assert status["state"] == "finished" and status["watch"]["paused_because"] is None
        points = status["watch"]["points"]
        # Batches of 4: a point at the start, then at each multiple of 8 re-embedded items.
        assert [p["done"] for p in points] == [0, 8, 16, 24, 32, 40] and status["watch"]["threshold"] == 0.0
        assert points[-1]["score"] == pytest.approx(at_the_end), "the whole gallery re-embedded: M(n,n)"

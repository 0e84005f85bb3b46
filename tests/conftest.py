"""Shared fixtures: tiny real image-folder datasets written as PNG files, and the shared data location."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# CI draws the same property-test examples on every run, so whether a commit lands never depends on the luck of the
# draw; local runs keep exploring new examples. Select with HYPOTHESIS_PROFILE=ci.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def shared_data_root() -> Path | None:
    env = os.environ.get("ADVBCT_DATA")
    candidates = [Path(env)] if env else [REPO.parent / "shared" / "data"]
    for path in candidates:
        if (path / "cifar100" / "train").is_dir():
            return path
    return None


@pytest.fixture
def real_data() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("real CIFAR-100 copy not found (set ADVBCT_DATA or place it at ../shared/data)")
    return root


def write_image_folder(
    root: Path, classes: int, train_per_class: int, test_per_class: int, size: int = 32, seed: int = 0
) -> Path:
    """``root/train|test/<class>/<n>.png`` with class-dependent colours, so classes are learnable."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(classes, 3))
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                noise = rng.normal(0, 40, size=(size, size, 3))
                pixels = np.clip(palette[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return root


@pytest.fixture
def tiny_folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ADVBCT_CACHE", str(tmp_path / "cache"))
    return write_image_folder(tmp_path / "data", classes=6, train_per_class=12, test_per_class=5)


@pytest.fixture(scope="session")
def three_models(tmp_path_factory):
    """Three tiny checkpoints (seeds 0, 1, 2, same embedding dim) trained on a PNG folder: stand-ins for old,
    new and independent models wherever real checkpoints are needed but their quality is not the point."""
    from advbct.pipeline import train_old
    from advbct.presets import train_config

    base = tmp_path_factory.mktemp("models")
    folder = write_image_folder(base / "data", classes=4, train_per_class=8, test_per_class=2)
    paths = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADVBCT_CACHE", str(base / "cache"))
        for seed, role in enumerate(("old", "new", "independent")):
            overrides = ["data.dataset=image-folder", "device=cpu", f"seed={seed}", "optim.epochs=1",
                         "data.validation_per_class=0"]  # fmt: skip
            cfg = train_config("old", "smoke", None, overrides, str(folder), None)
            paths[role] = train_old(cfg, base / role, show_progress=False)
    return paths


def run_advbct(*args, **kwargs):
    """The real console script in a subprocess."""
    return subprocess.run([sys.executable, "-m", "advbct", *args], capture_output=True, text=True, timeout=300,
                          **kwargs)  # fmt: skip


@pytest.fixture
def image_root(tmp_path):
    """40 training and 16 test PNG images in 4 classes: a gallery's image root."""
    return write_image_folder(tmp_path / "images", classes=4, train_per_class=10, test_per_class=4, seed=3)


@pytest.fixture(scope="session")
def milvus_server_uri(tmp_path_factory) -> Iterator[str]:
    """A real Milvus server: the one at ADVBCT_MILVUS_URI where set, else the standalone server of the ``milvus``
    package (etcd, storage and all in one process), started once for the session in a temporary folder."""
    if os.environ.get("ADVBCT_MILVUS_URI"):
        yield os.environ["ADVBCT_MILVUS_URI"]
        return
    if importlib.util.find_spec("milvus") is None:
        pytest.skip("no Milvus server: set ADVBCT_MILVUS_URI, or pip install milvus (a standalone server)")
    folder = tmp_path_factory.mktemp("milvus-server")
    try:
        server = start_milvus_server(folder)
    except (RuntimeError, TimeoutError, OSError) as exc:
        pytest.skip(f"the milvus package's server did not start here ({exc}); its logs are in {folder / 'logs'}")
    try:
        yield f"http://127.0.0.1:{server.listen_port}"
    finally:
        server.stop()


def start_milvus_server(folder: Path):
    """The ``milvus`` package's standalone server, its data and logs in ``folder``, started and healthy (stopped
    again if it does not come up). Also used by bench/bench_serving.py --start-server."""
    from milvus import MilvusServer

    server = MilvusServer(data_dir=str(folder))
    try:
        server.start()  # returns once the server's health check answers
    except BaseException:
        server.stop()
        raise
    return server


@dataclass(frozen=True)
class GalleryDb:
    """Where a test's gallery lives: a Milvus Lite file, or a collection of its own on a Milvus server."""

    uri: str
    collection: str = "gallery"

    @property
    def args(self) -> list[str]:
        return ["--db", self.uri, "--collection", self.collection]

    def open(self, dim: int):
        from advbct.serving.store import GalleryStore

        return GalleryStore(self.uri, dim, self.collection)


@pytest.fixture(params=["lite", pytest.param("server", marks=pytest.mark.slow)])
def gallery_db(request, tmp_path) -> Iterator[GalleryDb]:
    """A serving test runs on Milvus Lite and on a real Milvus server through the same code (the server runs are
    slow: each strongly consistent read waits for the server's next time tick)."""
    if request.param == "lite":
        yield GalleryDb(str(tmp_path / "gallery.db"))
        return
    from pymilvus import MilvusClient

    db = GalleryDb(request.getfixturevalue("milvus_server_uri"), f"test_{uuid.uuid4().hex}")
    yield db
    client = MilvusClient(db.uri)
    client.drop_collection(db.collection)
    client.close()


def build_gallery(three_models, image_root, db: GalleryDb, registry):
    """The training images indexed at generation 1 (the "old" model), then the "new" model registered as
    generation 2 through the gate's operator override (two unrelated tiny models fail the gate, as they should)."""
    add = run_advbct("index", "add", str(image_root / "train"), *db.args, "--image-root", str(image_root),
                     "--model", str(three_models["old"]), "--registry", str(registry))  # fmt: skip
    assert add.returncode == 0, add.stderr
    forced = run_advbct("upgrade", "--model", str(three_models["new"]), "--validation", str(image_root / "test"),
                        "--db", db.uri, "--registry", str(registry), "--force",
                        "--reason", "tiny test models")  # fmt: skip
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["gate"]["forced"] is True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def service(three_models, image_root, tmp_path):
    """A real uvicorn server on localhost over a Milvus Lite gallery at generation 2 (generation 1 indexed):
    (client, service, image root)."""
    from advbct.serving.api import ServiceConfig

    db, registry = GalleryDb(str(tmp_path / "gallery.db")), tmp_path / "registry.sqlite"
    build_gallery(three_models, image_root, db, registry)  # generation 1 indexed, generation 2 registered (forced)
    config = ServiceConfig(db.uri, registry, image_root, max_upload_bytes=60_000, backfill_batch=4)
    with serving(config) as client_and_service:
        yield client_and_service


@contextmanager
def serving(config):
    """``create_app(config)`` on a real uvicorn server on localhost: (client, service, image root)."""
    import httpx
    import uvicorn

    from advbct.serving.api import create_app

    app = create_app(config)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client, app.state.service, config.image_root
    finally:
        server.should_exit = True
        thread.join(timeout=10)

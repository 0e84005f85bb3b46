"""``advbct serve``: the HTTP API and web page over the gallery, the model registry and the backfill.

A registered compatible generation answers queries at once (its queries search the mixed gallery), while a
background thread re-embeds the items of older generations; search keeps working throughout. Bad input gets a
4xx with a message and changes nothing: a file that is not an image (400), one too large (413), a path outside
the image root (400), an unknown id (404), a checkpoint that does not fit or fails the gate (422). A gallery that
fails its check as it opens is served degraded (503 with the reason; see ``Service``).
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import APIRouter, FastAPI, File, Form, HTTPException, Request, Response, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from advbct.data.images import DataError
from advbct.errors import AdvbctError
from advbct.serving.backfill import BackfillProgress, ImageRoot, run_backfill
from advbct.serving.batcher import MicroBatcher
from advbct.serving.gate import GateRefused
from advbct.serving.ledger import GalleryDamaged, ItemLedger
from advbct.serving.metrics import CONTENT_TYPE, ServiceMetrics
from advbct.serving.models import Embedder
from advbct.serving.orders import (
    BackfillOrders,
    OrderConflict,
    check_inputs,
    check_order,
    forget_when_done,
    old_generation,
    resolve_order,
)
from advbct.serving.page import PAGE
from advbct.serving.registry import Generation, ModelRegistry
from advbct.serving.store import MAX_K, GalleryStore, StoreError
from advbct.serving.traffic import SearchTraffic
from advbct.serving.watch import LiveWatch, WatchConfig

# What a degraded service (a damaged gallery) still answers: its health, its metrics and the page that shows them.
UNGUARDED = ("/health", "/metrics", "/")


@dataclass(frozen=True)
class ServiceConfig:
    db: str
    registry: Path
    image_root: Path
    device: str = "cpu"
    collection: str = "gallery"
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    backfill_batch: int = 256
    backfill_order: str = "storage"  # the order of a backfill started without one (and with none saved)
    watch: WatchConfig | None = None  # the live watch's probe (advbct serve --probe)


class UpgradeRequest(BaseModel):
    path: str
    validation: str
    force: bool = False
    reason: str | None = None


class BackfillStart(BaseModel):
    order: str | None = None
    restart_order: bool = False


class AddByPath(BaseModel):
    paths: list[str]


class Service:
    """The state behind the API: the active model (behind a micro-batcher), the store and the backfill.

    A gallery that fails its check as it opens (Milvus holds another number of items than the registry's ledger
    recorded) is served degraded rather than refused: ``damage`` holds the one-line reason, ``/health`` answers 503
    with it, every route that reads or writes the gallery answers 503, and no backfill starts. A server that
    refused to start would leave a supervisor restarting it in a loop and a load balancer with nothing to ask;
    a degraded one tells both, and the operator, what is wrong, while nothing touches the gallery.
    """

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.registry = ModelRegistry(config.registry)
        active = self.registry.active
        if active is None:
            raise DataError(f"no model registered in {config.registry}; add items with --model first")
        self.lock = threading.Lock()
        self.embedder, self.generation = Embedder(active.path, config.device), active.number
        self.metrics = ServiceMetrics()
        self.batcher = MicroBatcher(self.embedder, self.generation, on_batch=self.metrics.batch_images.observe)
        self.ledger = ItemLedger(self.registry, config.collection)
        self.store = GalleryStore(
            config.db, self.embedder.dim, config.collection, ledger=self.ledger, on_search=self.metrics.count_search
        )
        self.damage: str | None = None
        try:
            self.ledger.check(self.store, by_generation=True)
        except GalleryDamaged as exc:
            self.damage = str(exc)
        self.backfill_thread: threading.Thread | None = None
        self.stop, self.pause = threading.Event(), threading.Event()
        self.progress = BackfillProgress(self.generation)
        self.orders = BackfillOrders(self.registry, config.collection)
        self.traffic = SearchTraffic.load(self.registry, config.collection)
        self.watch = None if config.watch is None else LiveWatch(config.watch)

    def follow_registry(self) -> None:
        """Serve the generation the registry names active, whoever changed it (this server, or a CLI upgrade or
        rollback on the same registry): a change is picked up at the next request."""
        if self.registry.active_number == self.generation:
            return
        with self.lock:
            active = self.registry.active
            if active is not None and active.number != self.generation:
                self.switch_to(active)

    def switch_to(self, generation: Generation) -> None:
        """Make ``generation`` the query model and re-target the backfill at it; a paused backfill stays paused.
        The caller holds ``self.lock``."""
        paused = self.pause.is_set()
        self.stop_backfill()
        self.embedder, self.generation = Embedder(generation.path, self.config.device), generation.number
        self.batcher.swap(self.embedder, self.generation)
        try:
            self.start_backfill(paused=paused)
        except DataError as exc:  # the switch stands; the backfill says why it did not start
            self.progress = BackfillProgress(self.generation, state="failed", failed=[str(exc)])

    def decode(self, data: bytes, name: str) -> np.ndarray:
        """An uploaded file as the model's square uint8 input; 413 for one too large (bytes or pixels, checked before
        decoding), 400 for one that is not an image."""
        if len(data) > self.config.max_upload_bytes:
            raise HTTPException(413, f"{name} is {len(data)} bytes; the limit is {self.config.max_upload_bytes}")
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > self.config.max_pixels:
                    raise HTTPException(413, f"{name} has {image.width}x{image.height} pixels; too large")
                return self.embedder.prep.square(image)
        except Image.DecompressionBombError:
            raise HTTPException(413, f"{name} claims more pixels than the limit of {self.config.max_pixels}") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise HTTPException(400, f"{name} is not a readable image: {exc}") from None

    def start_backfill(self, paused: bool = False, order: str | None = None, restart_order: bool = False) -> None:
        """Start the backfill to the active generation (no-op while one runs in the same order) in ``order``, or
        the order saved for it, or the configured default; ``restart_order`` replaces a saved or running order.

        An order the service cannot follow, or that conflicts with the saved or running one, is refused here
        (``DataError``, ``OrderConflict``) before anything changes; computing the order (reading every stale
        vector) runs in the backfill's thread, as state "ordering"."""
        if self.damage is not None:
            return
        running = self.backfill_thread is not None and self.backfill_thread.is_alive()
        if running and not restart_order:
            if order is not None and order != self.progress.order:
                check_order(order)
                raise OrderConflict(
                    f"the backfill to generation {self.progress.target_generation} is running in the "
                    f'{self.progress.order!r} order; to replace it, ask again with "restart_order": true'
                )
            if not paused:
                self.resume()
            return
        target, counts = self.generation, self.ledger.counts()
        plan = self.orders.plan(target, order, restart_order, self.config.backfill_order)
        if plan.ids is None:
            check_inputs(plan.policy, old_generation(self.registry, counts, target))
        if running:
            self.stop_backfill()
        self.traffic.save(self.registry, self.config.collection)
        traffic = self.traffic.counts() if plan.policy == "traffic" else None
        self.stop.clear()
        if paused:
            self.pause.set()
        else:
            self.resume()
        self.progress = progress = BackfillProgress(target, order=plan.policy, state="ordering")
        embedder = self.embedder

        def watched(p: BackfillProgress) -> None:
            if self.watch is not None and self.watch.due(p.done):
                self.watch_point(target, embedder, p.done, counts)

        def work() -> None:
            try:
                ids = resolve_order(self.orders, plan, self.store, target, counts, traffic)
                self.watch_point(target, embedder, 0, counts)
                run_backfill(self.store, embedder, target, self.config.image_root, self.config.backfill_batch,
                             stop=self.stop, pause=self.pause, progress=progress, order=ids,
                             on_batch=watched)  # fmt: skip
                forget_when_done(self.orders, self.store, target, progress.state, len(progress.skipped))
            except Exception as exc:  # whatever stops it, the state says so and why; the service stays up
                progress.state, progress.failed = "failed", [f"{type(exc).__name__}: {exc}"]

        self.backfill_thread = threading.Thread(target=work, name="advbct-backfill", daemon=True)
        self.backfill_thread.start()

    def resume(self) -> None:
        """Let the backfill run: the operator's word overrides a pause, the live watch's included."""
        if self.watch is not None:
            self.watch.reason = None
        self.pause.clear()

    def watch_point(self, target: int, embedder: Embedder, done: int, counts: dict[int, int]) -> None:
        """A point of the live watch (none without a probe); the first of a backfill also measures the default
        threshold, the old generation's own score (``counts``, the items per generation when it started, name
        the old generation)."""
        watch = self.watch
        if watch is None:
            return
        if watch.threshold(target) is None:
            old = old_generation(self.registry, counts, target) or self.registry.generation(target)
            watch.thresholds[target] = watch.old_score(Embedder(old.path, self.config.device), old.number, self.store)
        score = watch.score(embedder, self.store, self.registry.generation(target).mixed_merge())
        watch.observe(target, done, score, watch.threshold(target), self.pause)

    def generation_counts(self) -> dict[int, int]:
        """Items per generation from the registry's ledger: one short SQLite read, a snapshot whose counts sum to
        the items stored, however often the page polls it."""
        return self.ledger.counts()

    def stop_backfill(self) -> None:
        """Ask the backfill to stop and wait until its thread has ended."""
        self.stop.set()
        if self.backfill_thread is not None:
            self.backfill_thread.join()

    def close(self) -> None:
        """Stop the backfill and the batcher, and save the search traffic: what the server's shutdown runs."""
        self.stop_backfill()
        self.batcher.close()
        self.traffic.save(self.registry, self.config.collection)


def create_app(config: ServiceConfig) -> FastAPI:
    """The service's FastAPI app: one ``Service`` (gallery, registry, batcher, backfill) shared by every route; a
    damaged gallery answers 503 everywhere but the routes that report it."""
    service = Service(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(title="advbct retrieval service", lifespan=lifespan)
    app.state.service = service

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        if service.damage is not None and request.url.path not in UNGUARDED:
            response: Response = JSONResponse({"detail": service.damage}, status_code=503)
        else:
            response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        service.metrics.observe_request(request.method, route, response.status_code, time.perf_counter() - started)
        return response

    app.include_router(status_routes(service))
    app.include_router(model_routes(service, config))
    app.include_router(search_routes(service))
    app.include_router(item_routes(service, config))
    app.include_router(backfill_routes(service))
    return app


def status_routes(service: Service) -> APIRouter:
    """The page, health and Prometheus metrics."""
    router = APIRouter()

    @router.get("/metrics")
    def metrics() -> Response:
        service.follow_registry()
        p = service.progress
        service.metrics.set_backfill(p.items_per_s, p.done, service.generation_counts())
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @router.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @router.get("/health", response_model=None)
    def health() -> dict | JSONResponse:
        service.follow_registry()
        if service.damage is not None:
            return JSONResponse({"status": "damaged", "reason": service.damage, "active": service.generation}, 503)
        return {"status": "ok", "items": sum(service.generation_counts().values()), "active": service.generation}

    return router


def model_routes(service: Service, config: ServiceConfig) -> APIRouter:
    """Generations: list, gated upgrade (or roll-forward), rollback."""
    router = APIRouter()

    @router.get("/models")
    def models() -> dict:
        service.follow_registry()
        generations = [g.to_json() for g in service.registry.generations]
        return {"active": service.generation, "generations": generations}

    @router.post("/models")
    def upgrade(request: UpgradeRequest) -> dict:
        with service.lock:
            try:
                generation = service.registry.upgrade(
                    request.path, request.validation, config.device, request.force, request.reason
                )
            except (AdvbctError, FileNotFoundError) as exc:
                raise HTTPException(422, str(exc)) from None
            service.switch_to(generation)
        return {"generation": generation.number, "gate": generation.gate_json()}

    @router.post("/models/rollback")
    def rollback() -> dict:
        with service.lock:
            try:
                generation = service.registry.rollback()
            except GateRefused as exc:
                raise HTTPException(409, str(exc)) from None
            service.switch_to(generation)
        return {"active": generation.number}

    return router


def search_routes(service: Service) -> APIRouter:
    """Search with an uploaded image, answered by the active generation over the mixed gallery."""
    router = APIRouter()

    @router.post("/search")
    def search(image: UploadFile = File(...), k: int = Form(10)) -> dict:
        if not 1 <= k <= MAX_K:
            raise HTTPException(400, f"k must be between 1 and {MAX_K}")
        pixels = service.decode(image.file.read(), image.filename or "upload")
        service.follow_registry()
        vector, generation = service.batcher.embed(pixels[None])
        hits = service.store.search(vector, k, service.registry.generation(generation).mixed_merge())[0]
        service.traffic.record([h.id for h in hits])
        return {"active": generation, "hits": [h.__dict__ for h in hits]}

    return router


def item_routes(service: Service, config: ServiceConfig) -> APIRouter:
    """The gallery's items: add by upload or by path, delete, fetch the image."""
    router = APIRouter()

    @router.post("/items")
    def add_upload(image: UploadFile = File(...)) -> dict:
        data = image.file.read()
        pixels = service.decode(data, image.filename or "upload")
        uploads = config.image_root / "uploads"
        uploads.mkdir(parents=True, exist_ok=True)
        item_id = service.registry.reserve_ids(1)
        suffix = Path(image.filename or "").suffix.lower() or ".img"
        path = uploads / f"{item_id}{suffix}"
        path.write_bytes(data)
        ref = str(path.relative_to(config.image_root))
        service.follow_registry()
        service.store.add([item_id], [ref], *service.batcher.embed(pixels[None]))
        return {"ids": [item_id]}

    @router.post("/items/by-path")
    def add_paths(request: AddByPath) -> dict:
        if not request.paths:
            raise HTTPException(400, "paths is empty: name at least one image file under the image root")
        images = ImageRoot(config.image_root)
        try:
            files = [images.resolve(p) for p in request.paths]
        except DataError as exc:
            raise HTTPException(400, str(exc)) from None
        arrays = []
        for path in files:
            if not path.is_file():
                raise HTTPException(404, f"no image file {path.relative_to(images.root)}")
            arrays.append(service.decode(path.read_bytes(), path.name))
        start = service.registry.reserve_ids(len(files))
        ids = list(range(start, start + len(files)))
        refs = [str(p.relative_to(images.root)) for p in files]
        service.follow_registry()
        service.store.add(ids, refs, *service.batcher.embed(np.stack(arrays)))
        return {"ids": ids}

    @router.delete("/items/{item_id}")
    def delete(item_id: int) -> dict:
        try:
            service.store.delete([item_id])
        except StoreError as exc:
            raise HTTPException(404, str(exc)) from None
        return {"deleted": item_id}

    @router.get("/items/{item_id}/image")
    def item_image(item_id: int) -> FileResponse:
        rows = service.store.get([item_id])
        if not rows:
            raise HTTPException(404, f"unknown id {item_id}")
        return FileResponse(ImageRoot(config.image_root).resolve(rows[0]["ref"]))

    return router


def backfill_routes(service: Service) -> APIRouter:
    """The backfill's progress and its start, pause, resume and stop."""
    router = APIRouter()

    @router.get("/backfill")
    def backfill_status() -> dict:
        service.follow_registry()
        p = service.progress
        by_generation = service.generation_counts()
        stale = sum(n for g, n in by_generation.items() if g != service.generation)
        return {
            "state": p.state,
            "order": p.order,
            "target_generation": p.target_generation,
            "done": p.done,
            "remaining": stale,
            "items_per_s": p.items_per_s,
            "by_generation": by_generation,
            "failed": p.failed,
            "skipped": p.skipped,
            "watch": None if service.watch is None else service.watch.to_json(p.target_generation),
        }

    @router.post("/backfill/{action}")
    def backfill_control(action: str, request: BackfillStart | None = None) -> dict:
        """start, pause, resume or stop the backfill; start (or resume) takes an optional JSON body
        ``{"order": POLICY, "restart_order": false}``."""
        if request is not None and action not in ("start", "resume") and request.order is not None:
            raise HTTPException(400, f"an order is chosen when the backfill starts, not with {action!r}")
        if action == "start" or action == "resume":
            request = request or BackfillStart()
            try:
                service.start_backfill(order=request.order, restart_order=request.restart_order)
            except OrderConflict as exc:
                raise HTTPException(409, str(exc)) from None
            except DataError as exc:
                raise HTTPException(400, str(exc)) from None
        elif action == "pause":
            service.pause.set()
        elif action == "stop":
            service.stop_backfill()
        else:
            raise HTTPException(404, f"unknown backfill action {action!r}; use start, pause, resume or stop")
        return backfill_status()

    return router

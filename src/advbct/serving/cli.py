"""CLI for the gallery: ``advbct index add|search|stats|recount|migrate``, ``advbct upgrade``, ``advbct rollback``,
``advbct backfill``. An item's reference is its path relative to the image root; its id comes from the
registry's counter. Bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from advbct.cli_errors import errors, refused_as_exit
from advbct.data.images import IMAGE_SUFFIXES, DataError
from advbct.serving.backfill import BackfillProgress, run_backfill
from advbct.serving.ledger import ItemLedger, open_counted_store
from advbct.serving.models import Embedder
from advbct.serving.orders import SERVICE_ORDERS, BackfillOrders, check_order, forget_when_done, resolve_order
from advbct.serving.ray_backfill import RayPlan
from advbct.serving.registry import ModelRegistry
from advbct.serving.store import MAX_K, GalleryStore, is_server_uri, migrate_collection
from advbct.serving.traffic import SearchTraffic

index_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The gallery in Milvus.")
console = Console()

DbOpt = Annotated[str, typer.Option("--db", help="Milvus Lite file or Milvus URI (http://host:19530)")]
RegistryOpt = Annotated[Path | None, typer.Option("--registry", help="model registry (default: <db>.registry.sqlite)")]
RootOpt = Annotated[Path, typer.Option("--image-root", help="folder that item references are relative to")]
CollectionOpt = Annotated[
    str, typer.Option("--collection", help="the gallery's collection (several galleries can share one Milvus server)")
]
DeviceOpt = Annotated[str, typer.Option("--device")]


def registry_path(db: str, registry: Path | None) -> Path:
    """The registry file: ``registry`` where given, else beside a Milvus Lite file; a server URI has no file to
    sit beside, so it needs one named."""
    if registry is not None:
        return registry
    if is_server_uri(db):
        raise DataError("a Milvus server URI needs --registry PATH for the model registry file")
    return Path(db + ".registry.sqlite")


def open_gallery(
    db: str, registry: Path | None, device: str, collection: str, by_generation: bool = False
) -> tuple[ModelRegistry, Embedder, GalleryStore]:
    """The registry, the active model and the gallery, checked against the registry's item ledger as it opens
    (a damaged gallery is refused; ``by_generation``: the counts per generation are compared too)."""
    models = ModelRegistry(registry_path(db, registry))
    active = models.active
    if active is None:
        raise DataError("no model is registered yet: run `advbct index add --model CHECKPOINT ...` first")
    embedder = Embedder(active.path, device)
    return models, embedder, open_counted_store(models, db, embedder.dim, collection, by_generation)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@index_app.command("add")
def add_cmd(
    images: Annotated[Path, typer.Argument(help="an image file or a folder of them, inside the image root")],
    db: DbOpt = "gallery.db",
    collection: CollectionOpt = "gallery",
    image_root: RootOpt = Path("."),
    model: Annotated[Path | None, typer.Option("--model", help="first generation's checkpoint (new gallery)")] = None,
    registry: RegistryOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 256,
    device: DeviceOpt = "cpu",
) -> None:
    """Embed images with the active model and add them to the gallery."""
    with refused_as_exit():
        models = ModelRegistry(registry_path(db, registry))
        if models.active is None:
            if model is None:
                raise DataError("the gallery has no model yet: pass --model CHECKPOINT for generation 1")
            models.register_first(model, device)
        active = models.active
        embedder = Embedder(active.path, device)
        store = open_counted_store(models, db, embedder.dim, collection)
        files = [images] if images.is_file() else _image_files(images)
        if not files:
            raise DataError(f"no image files at {images}")
        added, present = add_files(store, models, embedder, active.number, files, image_root, batch_size)
        console.print(f"added {added} items at generation {active.number}; {present} were in the gallery already")


def add_files(
    store: GalleryStore, models: ModelRegistry, embedder: Embedder, generation: int,
    files: list[Path], image_root: Path, batch_size: int,
) -> tuple[int, int]:  # fmt: skip
    """Add the files no stored item names yet, a batch at a time; (added, already present).

    Idempotent by image reference: a run stopped by an undecodable file or a crash keeps the batches it
    committed, and running it again adds only the rest, never a second copy."""
    added = present = 0
    for offset in range(0, len(files), batch_size):
        chunk = files[offset : offset + batch_size]
        refs = [_reference(f, image_root) for f in chunk]
        stored = store.stored_refs(refs)
        todo = [(f, r) for f, r in zip(chunk, refs, strict=True) if r not in stored]
        present += len(chunk) - len(todo)
        if not todo:
            continue
        vectors = embedder.embed_files([f for f, _ in todo])
        start = models.reserve_ids(len(todo))
        store.add(list(range(start, start + len(todo))), [r for _, r in todo], vectors, generation)
        added += len(todo)
    return added, present


def _reference(path: Path, image_root: Path) -> str:
    """The item's reference: its path relative to the image root (a file outside it is refused)."""
    root, full = image_root.resolve(), path.resolve()
    if not full.is_relative_to(root):
        raise DataError(f"{path} is not inside the image root {image_root}")
    return str(full.relative_to(root))


@index_app.command("search")
def search_cmd(
    image: Annotated[Path, typer.Argument(help="query image file")],
    db: DbOpt = "gallery.db",
    collection: CollectionOpt = "gallery",
    registry: RegistryOpt = None,
    k: Annotated[int, typer.Option("-k", min=1, max=MAX_K)] = 10,
    device: DeviceOpt = "cpu",
) -> None:
    """Top-k gallery items for a query image, embedded by the active model."""
    with refused_as_exit():
        models, embedder, store = open_gallery(db, registry, device, collection)
        hits = store.search(embedder.embed_files([image]), k, models.active.mixed_merge())[0]
    print(json.dumps([h.__dict__ for h in hits], indent=1))


@index_app.command("stats")
def stats_cmd(
    db: DbOpt = "gallery.db",
    collection: CollectionOpt = "gallery",
    registry: RegistryOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Items per generation (the registry's ledger, checked against Milvus per generation as it opens), the active
    generation and the ledger's last reconciliation."""
    with refused_as_exit():
        models, _, store = open_gallery(db, registry, device, collection, by_generation=True)
        by_generation = store.ledger.counts()
        last = store.ledger.last_reconciliation()
        stats = {"items": sum(by_generation.values()), "by_generation": by_generation,
                 "active": models.active.number, "reconciled": None if last is None else last.__dict__}  # fmt: skip
        store.close()
    print(json.dumps(stats))


@index_app.command("recount")
def recount_cmd(
    db: DbOpt = "gallery.db",
    collection: CollectionOpt = "gallery",
    registry: RegistryOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Accept what the gallery holds: the registry's item ledger rebuilt from Milvus (after a damaged gallery was
    refused and no backup is to be restored). Stop any other process writing to the gallery first."""
    with refused_as_exit():
        models = ModelRegistry(registry_path(db, registry))
        active = models.active
        if active is None:
            raise DataError("no model is registered yet: run `advbct index add --model CHECKPOINT ...` first")
        ledger = ItemLedger(models, collection)
        store = GalleryStore(db, Embedder(active.path, device).dim, collection, ledger=ledger)
        recorded = ledger.counts()
        ledger.rebuild(store, f"accepted with `advbct index recount` (the ledger recorded {recorded})")
        found = ledger.counts()
        store.close()
    print(json.dumps({"recorded": recorded, "found": found}))


@index_app.command("migrate")
def migrate_cmd(db: DbOpt = "gallery.db", collection: CollectionOpt = "gallery") -> None:
    """Convert a gallery made by an older advbct (one vector per item) to keep previous vectors: every item keeps
    its id, reference, vector and generation. Stop any other process writing to the gallery first; a conversion
    stopped part-way is finished by running it again."""
    with refused_as_exit():
        items = migrate_collection(db, collection)
    print(json.dumps({"migrated": items}))


def upgrade_cmd(
    model: Annotated[Path, typer.Option("--model", help="candidate checkpoint")],
    validation: Annotated[Path, typer.Option("--validation", help="labelled image folder <class>/<file>")],
    db: DbOpt = "gallery.db",
    registry: RegistryOpt = None,
    force: Annotated[bool, typer.Option("--force", help="register even if the gate fails (numbers recorded)")] = False,
    reason: Annotated[str | None, typer.Option("--reason", help="why the gate is overridden (with --force)")] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Register a new generation behind the compatibility gate; it serves queries at once."""
    with refused_as_exit():
        generation = ModelRegistry(registry_path(db, registry)).upgrade(model, validation, device, force, reason)
    print(json.dumps({"generation": generation.number, "gate": generation.gate_json()}))


def rollback_cmd(db: DbOpt = "gallery.db", registry: RegistryOpt = None) -> None:
    """Make the previous generation active again (backfill then re-embeds towards it)."""
    with refused_as_exit():
        generation = ModelRegistry(registry_path(db, registry)).rollback()
    print(json.dumps({"active": generation.number}))


ENGINES = ("process", "ray")
OrderOpt = Annotated[
    str | None,
    typer.Option("--order", help=f"which first: {', '.join(SERVICE_ORDERS)} (default: the saved order, else storage)"),
]
RestartOrderOpt = Annotated[
    bool, typer.Option("--restart-order", help="replace the order saved for this backfill with --order's")
]


def backfill_cmd(
    db: DbOpt = "gallery.db",
    collection: CollectionOpt = "gallery",
    image_root: RootOpt = Path("."),
    registry: RegistryOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 256,
    worker: Annotated[int, typer.Option("--worker", help="this worker's index")] = 0,
    workers: Annotated[int, typer.Option("--workers", help="number of workers splitting the gallery")] = 1,
    device: DeviceOpt = "cpu",
    engine: Annotated[str, typer.Option("--engine", help="process (this process) or ray (Ray Data)")] = "process",
    address: Annotated[
        str | None, typer.Option("--address", help="with --engine ray: a Ray cluster (host:6379, ray://host:10001)")
    ] = None,
    actors: Annotated[int | None, typer.Option("--actors", min=1, help="with --engine ray: embedding actors")] = None,
    gpus_per_actor: Annotated[
        float | None, typer.Option("--gpus-per-actor", min=0, help="with --engine ray (default: 1 where GPUs exist)")
    ] = None,
    order: OrderOpt = None,
    restart_order: RestartOrderOpt = False,
) -> None:
    """Re-embed items not at the active generation; safe to kill and restart at any point.

    The order (``--order``) is saved with the backfill the first time it starts and kept by every resumed run;
    another order for the same generation needs ``--restart-order``."""

    def report(progress: BackfillProgress) -> None:
        print(json.dumps({"done": progress.done, "remaining": progress.remaining,
                          "items_per_s": round(progress.items_per_s, 1)}), flush=True)  # fmt: skip

    with refused_as_exit():
        if engine not in ENGINES:
            raise DataError(f"--engine {engine!r}: use one of {', '.join(ENGINES)}")
        if engine == "ray":
            if workers != 1 or worker != 0:
                raise DataError("--workers/--worker split a process backfill; --engine ray shares the work out itself")
            plan = RayPlan(address, actors, gpus_per_actor, batch_size)
            progress = _ray_backfill(db, registry, collection, image_root, plan, report, (order, restart_order))
        else:
            if address is not None or actors is not None or gpus_per_actor is not None:
                raise DataError("--address, --actors and --gpus-per-actor need --engine ray")
            models, embedder, store = open_gallery(db, registry, device, collection)
            target = models.active.number
            orders = BackfillOrders(models, collection)
            policy, ids = ordered_ids(orders, store, target, order, restart_order)
            progress = BackfillProgress(target, order=policy)
            run_backfill(store, embedder, target, image_root, batch_size, worker, workers, progress=progress,
                         on_batch=report, order=ids)  # fmt: skip
            forget_when_done(orders, store, target, progress.state, len(progress.skipped))
    summary = {"state": progress.state, "order": progress.order, "done": progress.done, "remaining": progress.remaining}
    print(json.dumps({**summary, "skipped": progress.skipped}))


def ordered_ids(
    orders: BackfillOrders, store: GalleryStore, target: int, requested: str | None, restart: bool
) -> tuple[str, list[int] | None]:
    """The backfill's order policy and ids (``None``: storage order): the saved order, or the requested one
    computed from what the gallery holds and saved."""
    plan = orders.plan(target, requested, restart)
    counts = store.ledger.counts() if store.ledger is not None else store.generations()
    traffic = SearchTraffic.load(orders.registry, orders.collection).counts() if plan.policy == "traffic" else None
    return plan.policy, resolve_order(orders, plan, store, target, counts, traffic)


def _ray_backfill(
    db: str, registry: Path | None, collection: str, image_root: Path, plan: RayPlan,
    report: Callable[[BackfillProgress], None], order: tuple[str | None, bool],
) -> BackfillProgress:  # fmt: skip
    """The backfill on Ray Data: Ray is checked for first, and the model is loaded only by the Ray actors.
    ``order``: the requested order policy and whether it restarts a saved one."""
    from advbct.serving.ray_backfill import import_ray, run_ray_backfill

    import_ray()
    models = ModelRegistry(registry_path(db, registry))
    active = models.active
    if active is None:
        raise DataError("no model is registered yet: run `advbct index add --model CHECKPOINT ...` first")
    store = open_counted_store(models, db, active.dim, collection)
    orders = BackfillOrders(models, collection)
    policy, ids = ordered_ids(orders, store, active.number, *order)
    progress = BackfillProgress(active.number, order=policy)
    run_ray_backfill(store, active, image_root, plan, progress=progress, on_batch=report, order=ids)
    forget_when_done(orders, store, active.number, progress.state, len(progress.skipped))
    return progress


def serve_cmd(
    db: DbOpt = "gallery.db",
    collection: CollectionOpt = "gallery",
    image_root: RootOpt = Path("."),
    registry: RegistryOpt = None,
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    device: DeviceOpt = "cpu",
    backfill: Annotated[bool, typer.Option("--backfill/--no-backfill", help="start the backfill at once")] = True,
    order: Annotated[
        str, typer.Option("--order", help="the order of backfills started without one and with none saved")
    ] = "storage",
    probe: Annotated[
        Path | None, typer.Option("--probe", help="live watch: a labelled folder <class>/<image>, not in the gallery")
    ] = None,
    probe_every: Annotated[int, typer.Option("--probe-every", min=1, help="re-embedded items between points")] = 1000,
    probe_threshold: Annotated[
        float | None,
        typer.Option("--probe-threshold", min=0, max=1, help="pause below this precision@10 (default: old's own)"),
    ] = None,
) -> None:
    """The HTTP API and web page (FastAPI + uvicorn) over the gallery."""
    import uvicorn

    from advbct.serving.api import ServiceConfig, create_app
    from advbct.serving.watch import WatchConfig

    with refused_as_exit():
        check_order(order)
        watch = None if probe is None else WatchConfig(probe, probe_every, probe_threshold)
        config = ServiceConfig(db, registry_path(db, registry), image_root, device, collection, backfill_order=order,
                               watch=watch)  # fmt: skip
        app = create_app(config)
        if app.state.service.damage is not None:
            errors.print(f"[red]error:[/] {app.state.service.damage}; serving degraded: /health answers 503")
        if backfill:
            app.state.service.start_backfill()
    uvicorn.run(app, host=host, port=port)

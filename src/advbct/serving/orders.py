"""Which stale items a backfill re-embeds first, chosen once per target generation and kept until it is done.

The policies are those of ``advbct.evaluation.backfill`` (random, the old classifier's uncertainty, distance from
the old class centres), fed with what the gallery already holds: the stale items' stored vectors (written
L2-normalised), the old generation's classifier (its checkpoint's head) and its class centres (``stats.pt`` beside
that checkpoint, written by ``advbct stats``). ``storage`` keeps the store's own listing (ids ascending: the order
items were added in), and ``traffic`` puts the items recent searches returned most often first. ``oracle`` needs
every item's new embedding, which is what the backfill computes, so it is offline only.

An order is computed from the items stale when its backfill first starts and saved in the registry's SQLite file
(``backfill_orders``: collection, target generation, policy, the ordered ids). A backfill resumed after any stop,
``kill -9`` included, re-embeds in that saved order, whichever process resumes it: re-computing would give a
different order (a random one is drawn over fewer items, the traffic has moved on), so the items done first would
no longer be the ones the policy ranked first. Asking for another policy while one is saved is refused unless the
caller says to start the order again (``restart``): an order silently replaced half-way is what saving prevents.
The saved order is dropped once no item is left stale.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from advbct.compat.statistics import StatisticsError, load_statistics
from advbct.data.images import DataError
from advbct.evaluation.backfill import GalleryState, backfill_order
from advbct.models.checkpoint import load_checkpoint
from advbct.serving.registry import Generation, ModelRegistry
from advbct.serving.store import GalleryStore
from advbct.serving.traffic import traffic_order

ORDERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS backfill_orders (
    collection TEXT NOT NULL, target INTEGER NOT NULL, policy TEXT NOT NULL, ids BLOB NOT NULL,
    created_at REAL NOT NULL, PRIMARY KEY (collection, target)
);
"""

STORAGE = "storage"
SERVICE_ORDERS = (STORAGE, "random", "uncertainty", "centre-distance", "traffic")
NEEDS_VECTORS = ("uncertainty", "centre-distance")
OFFLINE_ONLY = {
    "oracle": "it needs every item's new embedding, which is what the backfill computes (offline only: "
    "advbct backfill-curves)"
}


class OrderConflict(DataError):
    """Another order is saved for this backfill: replacing it half-way needs an explicit restart."""


def check_order(policy: str) -> None:
    """Refuse a policy the service cannot follow, in one line that lists those it can."""
    if policy in OFFLINE_ONLY:
        raise DataError(f"backfill order {policy!r} is refused in the service: {OFFLINE_ONLY[policy]}")
    if policy not in SERVICE_ORDERS:
        raise DataError(f"unknown backfill order {policy!r}; choose one of {', '.join(SERVICE_ORDERS)}")


@dataclass(frozen=True)
class SavedOrder:
    policy: str
    ids: list[int]


@dataclass(frozen=True)
class OrderPlan:
    """What a backfill start decided: the policy, the saved ids where it resumes one (``None``: compute them), and
    whether a saved order is to be replaced."""

    policy: str
    ids: list[int] | None
    replace: bool = False


class BackfillOrders:
    """The saved orders, in the registry's SQLite file; every call reads the file afresh."""

    def __init__(self, registry: ModelRegistry, collection: str):
        self.registry, self.collection = registry, collection
        with closing(sqlite3.connect(registry.path, timeout=30.0)) as db:
            db.executescript(ORDERS_SCHEMA)

    def saved(self, target: int) -> SavedOrder | None:
        """The order saved for the backfill to ``target``, if any."""
        with self.registry._transaction() as db:
            row = db.execute(
                "SELECT policy, ids FROM backfill_orders WHERE collection = ? AND target = ?",
                (self.collection, target),
            ).fetchone()
        return None if row is None else SavedOrder(row[0], np.frombuffer(row[1], dtype=np.int64).tolist())

    def plan(self, target: int, requested: str | None, restart: bool = False, default: str = STORAGE) -> OrderPlan:
        """The order a backfill to ``target`` follows: the saved one where there is one (``requested`` must then
        name it, or be absent), else ``requested`` or ``default``. ``restart`` replaces a saved order and needs
        ``requested``."""
        if restart and requested is None:
            raise DataError("restarting the backfill order needs the order to start again with (--order POLICY)")
        check_order(requested if requested is not None else default)
        saved = self.saved(target)
        if saved is not None and not restart:
            if requested is not None and requested != saved.policy:
                raise OrderConflict(
                    f"the backfill to generation {target} keeps the {saved.policy!r} order it started with; to "
                    f'replace it, ask again with --restart-order (HTTP: "restart_order": true)'
                )
            return OrderPlan(saved.policy, saved.ids)
        return OrderPlan(requested if requested is not None else default, None, replace=restart)

    def save(self, target: int, policy: str, ids: list[int], replace: bool) -> list[int]:
        """Save a computed order and return the one saved: a concurrent worker that saved first wins (same
        policy), so every worker of a backfill follows one order."""
        with self.registry._transaction(write=True) as db:
            if replace:
                db.execute("DELETE FROM backfill_orders WHERE collection = ? AND target = ?", (self.collection, target))
            db.execute(
                "INSERT OR IGNORE INTO backfill_orders VALUES (?, ?, ?, ?, ?)",
                (self.collection, target, policy, np.asarray(ids, dtype=np.int64).tobytes(), time.time()),
            )
        saved = self.saved(target)
        if saved is None or saved.policy != policy:
            raise OrderConflict(f"another process saved the {getattr(saved, 'policy', None)!r} order meanwhile")
        return saved.ids

    def clear(self, target: int) -> None:
        """Drop the order saved for the backfill to ``target``."""
        with self.registry._transaction(write=True) as db:
            db.execute("DELETE FROM backfill_orders WHERE collection = ? AND target = ?", (self.collection, target))


def old_generation(registry: ModelRegistry, counts: Mapping[int, int], target: int) -> Generation | None:
    """The generation whose model embedded most of the stale items: its classifier and centres read the stored
    vectors (items of a third generation, which the gate made compatible with it, are read by the same model)."""
    stale = {g: n for g, n in counts.items() if g != target and n > 0}
    if not stale:
        return None
    return registry.generation(max(stale, key=lambda g: (stale[g], g)))


def old_centres(generation: Generation) -> torch.Tensor:
    """The old generation's class centres from ``stats.pt`` beside its checkpoint, or a one-line hint."""
    checkpoint = Path(generation.path)
    try:
        return load_statistics(checkpoint.parent / "stats.pt", expected_model_id=generation.model_id).centres
    except StatisticsError as exc:
        raise DataError(
            f"the 'centre-distance' order needs the old class centres of generation {generation.number}: "
            f"{str(exc).splitlines()[0]}; run `advbct stats --old {checkpoint}`"
        ) from None


def check_inputs(policy: str, old: Generation | None) -> None:
    """Refuse at once an order whose inputs are missing (the centres), before any work starts."""
    if policy == "centre-distance" and old is not None:
        old_centres(old)


def compute_order(
    policy: str,
    store: GalleryStore,
    target: int,
    old: Generation | None,
    traffic: tuple[np.ndarray, np.ndarray] | None = None,
    seed: int = 0,
) -> list[int]:
    """The stale items' ids in ``policy``'s order (not ``storage``, which needs none). ``traffic``: (ids, counts)
    of recent search hits, for the ``traffic`` policy."""
    ids, vectors = store.stale_items(target, with_vectors=policy in NEEDS_VECTORS)
    if ids.shape[0] == 0:
        return []
    if policy == "traffic":
        hit_ids, hit_counts = traffic if traffic is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        return traffic_order(ids, hit_ids, hit_counts).tolist()
    if old is None and policy in NEEDS_VECTORS:
        raise DataError(f"the {policy!r} order needs the generation that embedded the stale items; none is registered")
    state = GalleryState(torch.zeros(ids.shape[0], 0) if vectors is None else torch.from_numpy(vectors), seed)
    if policy == "uncertainty":
        state = GalleryState(state.old, seed, old_classifier=load_checkpoint(old.path)[0].head.eval())
    elif policy == "centre-distance":
        state = GalleryState(state.old, seed, old_centres=old_centres(old))
    return ids[backfill_order(policy, state).numpy()].tolist()


def resolve_order(
    orders: BackfillOrders,
    plan: OrderPlan,
    store: GalleryStore,
    target: int,
    counts: Mapping[int, int],
    traffic: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[int] | None:
    """The ids a backfill follows for ``plan`` (``None``: storage order), computed and saved where none is saved.
    ``counts``: items per generation, which name the old generation."""
    if plan.ids is not None:
        return plan.ids
    if plan.policy == STORAGE:
        if plan.replace:
            orders.clear(target)
        return None
    old = old_generation(orders.registry, counts, target)
    return orders.save(target, plan.policy, compute_order(plan.policy, store, target, old, traffic), plan.replace)


def forget_when_done(orders: BackfillOrders, store: GalleryStore, target: int, state: str, skipped: int) -> None:
    """Drop the saved order once a finished backfill left nothing stale but the items it could not decode (other
    workers may still be busy on their shards until then)."""
    if state == "finished" and store.count(f"generation != {int(target)}") <= skipped:
        orders.clear(target)

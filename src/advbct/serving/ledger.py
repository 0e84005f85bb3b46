"""Each gallery item's generation mirrored in the registry's SQLite file: progress counters that are a snapshot,
and the record that tells a damaged gallery from a healthy one when it is opened.

Why a mirror per item rather than counters changed by deltas: a write to Milvus and a write to SQLite cannot
share a transaction, so a process killed between them leaves the two apart, and the repair must not depend on
knowing whether the Milvus write landed. Every write is therefore journalled first (``pending_writes``: the ids it
touches), then sent to Milvus, then settled (the mirror set to the items' new state and the journal entry removed,
one transaction). Setting a state is idempotent where adding a delta is not: an interrupted write is repaired by
reading those ids' generations back from Milvus and setting them, which is right whether the write landed or not,
and right even while the writer is still alive (its own settlement then sets the same state again).

Counts per generation are kept from the mirror by SQLite triggers, inside the same transactions, so a reader gets
them in one short read and they always sum to the number of items mirrored.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass

from advbct.serving.registry import ModelRegistry
from advbct.serving.store import GalleryStore, StoreError, is_server_uri

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    collection TEXT NOT NULL, id INTEGER NOT NULL, generation INTEGER NOT NULL, PRIMARY KEY (collection, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS item_counts (
    collection TEXT NOT NULL, generation INTEGER NOT NULL, items INTEGER NOT NULL, PRIMARY KEY (collection, generation)
);
CREATE TABLE IF NOT EXISTS pending_writes (
    token INTEGER PRIMARY KEY AUTOINCREMENT, collection TEXT NOT NULL, ids TEXT NOT NULL, started_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reconciliations (
    collection TEXT NOT NULL, at REAL NOT NULL, items INTEGER NOT NULL, repaired INTEGER NOT NULL, reason TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS item_added AFTER INSERT ON items BEGIN
    INSERT INTO item_counts VALUES (NEW.collection, NEW.generation, 1)
        ON CONFLICT (collection, generation) DO UPDATE SET items = items + 1;
END;
CREATE TRIGGER IF NOT EXISTS item_removed AFTER DELETE ON items BEGIN
    UPDATE item_counts SET items = items - 1 WHERE collection = OLD.collection AND generation = OLD.generation;
END;
CREATE TRIGGER IF NOT EXISTS item_moved AFTER UPDATE OF generation ON items BEGIN
    UPDATE item_counts SET items = items - 1 WHERE collection = OLD.collection AND generation = OLD.generation;
    INSERT INTO item_counts VALUES (NEW.collection, NEW.generation, 1)
        ON CONFLICT (collection, generation) DO UPDATE SET items = items + 1;
END;
"""

# Ids per statement when the mirror is read back from Milvus: an ``id in [...]`` filter of this size stays short.
REPAIR_CHUNK = 4096


class GalleryDamaged(StoreError):
    """Milvus holds a different number of items than the registry recorded, beyond what writes in flight explain."""


@dataclass(frozen=True)
class Reconciliation:
    at: float
    items: int
    repaired: int
    reason: str


@dataclass(frozen=True)
class _Snapshot:
    total: int
    pending: int  # ids named by writes journalled and not yet settled


class ItemLedger:
    """The mirror of one collection's items (id -> generation) in a registry file; see the module docstring."""

    def __init__(self, registry: ModelRegistry, collection: str):
        self.registry, self.collection = registry, collection
        with closing(sqlite3.connect(registry.path, timeout=30.0)) as db:
            db.executescript(LEDGER_SCHEMA)

    def counts(self) -> dict[int, int]:
        """Items per generation, as of the last settled write: one consistent read."""
        with self.registry._transaction() as db:
            rows = db.execute(
                "SELECT generation, items FROM item_counts WHERE collection = ? AND items > 0 ORDER BY generation",
                (self.collection,),
            ).fetchall()
        return {int(g): int(n) for g, n in rows}

    def total(self) -> int:
        return sum(self.counts().values())

    def last_reconciliation(self) -> Reconciliation | None:
        """The latest time the mirror was rebuilt or repaired from Milvus (``None``: never, a gallery not seen yet)."""
        with self.registry._transaction() as db:
            row = db.execute(
                "SELECT at, items, repaired, reason FROM reconciliations WHERE collection = ? ORDER BY at DESC LIMIT 1",
                (self.collection,),
            ).fetchone()
        return None if row is None else Reconciliation(*row)

    def begin(self, ids: Sequence[int]) -> int:
        """Journal a write of ``ids`` before it is sent to Milvus; the token settles it."""
        with self.registry._transaction(write=True) as db:
            cursor = db.execute(
                "INSERT INTO pending_writes (collection, ids, started_at) VALUES (?, ?, ?)",
                (self.collection, json.dumps([int(i) for i in ids]), time.time()),
            )
            return int(cursor.lastrowid)

    def settle(self, token: int, ids: Sequence[int], generation: int | None) -> None:
        """The write landed: ``ids`` are now at ``generation`` (``None``: deleted), and the journal entry goes."""
        with self.registry._transaction(write=True) as db:
            self._set(db, {int(i): generation for i in ids})
            db.execute("DELETE FROM pending_writes WHERE token = ?", (token,))

    def _set(self, db: sqlite3.Connection, states: dict[int, int | None]) -> None:
        gone = [(self.collection, i) for i, g in states.items() if g is None]
        kept = [(self.collection, i, g) for i, g in states.items() if g is not None]
        db.executemany("DELETE FROM items WHERE collection = ? AND id = ?", gone)
        db.executemany(
            "INSERT INTO items VALUES (?, ?, ?) ON CONFLICT (collection, id) DO UPDATE SET generation = "
            "excluded.generation WHERE generation != excluded.generation",
            kept,
        )

    def repair_pending(self, store: GalleryStore) -> int:
        """Settle every journalled write from what Milvus holds for its ids; the number of items repaired.

        A writer still alive is not disturbed: an entry it settles meanwhile is skipped, and one repaired before
        it settles is set again by its settlement to the state its own write left."""
        with self.registry._transaction() as db:
            entries = db.execute(
                "SELECT token, ids FROM pending_writes WHERE collection = ?", (self.collection,)
            ).fetchall()
        repaired = 0
        for token, text in entries:
            ids = json.loads(text)
            found: dict[int, int] = {}
            for start in range(0, len(ids), REPAIR_CHUNK):
                found.update(store.generation_of(ids[start : start + REPAIR_CHUNK]))
            with self.registry._transaction(write=True) as db:
                if db.execute("SELECT 1 FROM pending_writes WHERE token = ?", (token,)).fetchone() is None:
                    continue
                self._set(db, {int(i): found.get(int(i)) for i in ids})
                db.execute("DELETE FROM pending_writes WHERE token = ?", (token,))
            repaired += len(ids)
        return repaired

    def rebuild(self, store: GalleryStore, reason: str) -> int:
        """The mirror replaced by what Milvus holds now (every id and generation listed), recorded with ``reason``:
        a gallery seen for the first time, or an operator accepting what a damaged one still holds."""
        states = store.all_generations()
        with self.registry._transaction(write=True) as db:
            db.execute("DELETE FROM items WHERE collection = ?", (self.collection,))
            db.execute("DELETE FROM item_counts WHERE collection = ?", (self.collection,))
            db.execute("DELETE FROM pending_writes WHERE collection = ?", (self.collection,))
            self._set(db, dict(states))
            self._record(db, len(states), len(states), reason)
        return len(states)

    def _record(self, db: sqlite3.Connection, items: int, repaired: int, reason: str) -> None:
        db.execute("INSERT INTO reconciliations VALUES (?, ?, ?, ?, ?)",
                   (self.collection, time.time(), items, repaired, reason))  # fmt: skip

    def record(self, items: int, repaired: int, reason: str) -> None:
        """Record a reconciliation: the items found, those repaired, and why."""
        with self.registry._transaction(write=True) as db:
            self._record(db, items, repaired, reason)

    def _snapshot(self) -> _Snapshot:
        with self.registry._transaction() as db:
            total = db.execute(
                "SELECT COALESCE(SUM(items), 0) FROM item_counts WHERE collection = ?", (self.collection,)
            ).fetchone()[0]
            pending = db.execute("SELECT ids FROM pending_writes WHERE collection = ?", (self.collection,)).fetchall()
        return _Snapshot(int(total), sum(len(json.loads(text)) for (text,) in pending))

    @contextmanager
    def writing(self, store: GalleryStore, ids: Sequence[int], generation: int | None) -> Iterator[None]:
        """Journal, let the caller write to Milvus, settle. A write that raises stays journalled (it may or may not
        have landed) and is repaired at once where Milvus still answers, else when the gallery is next opened."""
        token = self.begin(ids)
        try:
            yield
        except BaseException:
            with suppress(Exception):  # Milvus failing: the entry stays journalled, for the next open to repair
                self.repair_pending(store)
            raise
        self.settle(token, ids, generation)

    def check(self, store: GalleryStore, by_generation: bool = False) -> None:
        """Refuse a gallery whose Milvus count differs from the mirror's beyond the writes in flight; repair the
        writes a crash interrupted (recorded). A gallery never seen with a mirror is taken as it is (recorded).

        ``by_generation``: also compare the counts per generation (one filtered count each, a scan of the whole
        collection in Milvus Lite: affordable once as a server starts, not on every CLI command) and rebuild the
        mirror where they differ with the total equal (no item lost: a write behind the registry's back, or an older
        state of the same items). Done on Milvus Lite only, which one process holds: on a server other writers may be
        mid-write and a listing would race them."""
        if self.last_reconciliation() is None:
            self.rebuild(store, "first opened with item counts: the mirror taken from Milvus")
            return
        repaired = self.repair_pending(store)
        before = self._snapshot()
        found = store.count()
        after = self._snapshot()
        slack = before.pending + after.pending
        if not min(before.total, after.total) - slack <= found <= max(before.total, after.total) + slack:
            in_flight = f" (give or take {slack} items of writes in flight)" if slack else ""
            raise GalleryDamaged(
                f"gallery {self.collection!r} in {store.uri} is damaged: the registry {self.registry.path} records "
                f"{after.total} items{in_flight}, Milvus holds {found}; restore it from a backup, or accept what it "
                "holds with `advbct index recount`"
            )
        if by_generation and not is_server_uri(store.uri):
            real, mirrored = store.generations(), self.counts()
            if real != mirrored:
                self.rebuild(store, f"counts by generation {mirrored} differed from Milvus's {real}")
                return
        if repaired:
            self.record(after.total, repaired, "writes interrupted between Milvus and the registry, repaired")


def open_counted_store(
    registry: ModelRegistry, uri: str, dim: int, collection: str = "gallery", by_generation: bool = False
) -> GalleryStore:
    """The gallery with its writes mirrored in ``registry``, checked as it is opened (see ``ItemLedger.check``);
    a damaged one is closed again and refused with ``GalleryDamaged``."""
    store = GalleryStore(uri, dim, collection, ledger=ItemLedger(registry, collection))
    try:
        store.ledger.check(store, by_generation)
    except BaseException:
        store.close()
        raise
    return store

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
them in one short read and they always sum to the number of items mirrored. So are the counts of items per
generation of their kept vector, which tell a search which parts of the gallery it can skip (``search_parts``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from typing import Literal

from advbct.serving.registry import ModelRegistry
from advbct.serving.store import GalleryStore, SearchParts, StoreError, is_server_uri

# ``previous_generation`` is the generation of an item's kept vector (0: none). ``pending_writes.generation`` is
# the generation a write sets (NULL: a delete).
LEDGER_TABLES = """
CREATE TABLE IF NOT EXISTS items (
    collection TEXT NOT NULL, id INTEGER NOT NULL, generation INTEGER NOT NULL, previous_generation INTEGER NOT NULL,
    PRIMARY KEY (collection, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS item_counts (
    collection TEXT NOT NULL, generation INTEGER NOT NULL, items INTEGER NOT NULL, PRIMARY KEY (collection, generation)
);
CREATE TABLE IF NOT EXISTS kept_counts (
    collection TEXT NOT NULL, generation INTEGER NOT NULL, items INTEGER NOT NULL, PRIMARY KEY (collection, generation)
);
CREATE TABLE IF NOT EXISTS pending_writes (
    token INTEGER PRIMARY KEY AUTOINCREMENT, collection TEXT NOT NULL, ids TEXT NOT NULL, started_at REAL NOT NULL,
    generation INTEGER
);
CREATE TABLE IF NOT EXISTS reconciliations (
    collection TEXT NOT NULL, at REAL NOT NULL, items INTEGER NOT NULL, repaired INTEGER NOT NULL, reason TEXT NOT NULL
);
"""
# Columns a ledger made before they existed lacks; its items' kept generations are unknown until the mirror is
# rebuilt from Milvus (``ItemLedger.check`` does it), and counted meanwhile under UNKNOWN_KEPT.
UNKNOWN_KEPT = -1
ADDED_COLUMNS = {
    "items": f"previous_generation INTEGER NOT NULL DEFAULT {UNKNOWN_KEPT}",
    "pending_writes": "generation INTEGER",
}
LEDGER_TRIGGERS = """
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
CREATE TRIGGER IF NOT EXISTS kept_added AFTER INSERT ON items WHEN NEW.previous_generation != 0 BEGIN
    INSERT INTO kept_counts VALUES (NEW.collection, NEW.previous_generation, 1)
        ON CONFLICT (collection, generation) DO UPDATE SET items = items + 1;
END;
CREATE TRIGGER IF NOT EXISTS kept_removed AFTER DELETE ON items BEGIN
    UPDATE kept_counts SET items = items - 1
        WHERE collection = OLD.collection AND generation = OLD.previous_generation;
END;
CREATE TRIGGER IF NOT EXISTS kept_moved AFTER UPDATE OF previous_generation ON items BEGIN
    UPDATE kept_counts SET items = items - 1
        WHERE collection = OLD.collection AND generation = OLD.previous_generation;
    INSERT INTO kept_counts SELECT NEW.collection, NEW.previous_generation, 1 WHERE NEW.previous_generation != 0
        ON CONFLICT (collection, generation) DO UPDATE SET items = items + 1;
END;
"""


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Add the ``ADDED_COLUMNS`` a ledger made before them lacks; its items' kept generations, not known yet, are
    counted under ``UNKNOWN_KEPT`` so that no search skips their part before the mirror is rebuilt."""
    for table, column in ADDED_COLUMNS.items():
        if column.split()[0] in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            continue
        db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        if table == "items":
            db.execute("INSERT INTO kept_counts SELECT collection, ?, COUNT(*) FROM items GROUP BY collection",
                       (UNKNOWN_KEPT,))  # fmt: skip


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


# An item's (generation, previous generation) as a write leaves it; None: deleted.
ItemState = tuple[int, int] | None


@dataclass(frozen=True)
class _Snapshot:
    total: int
    pending: int  # ids named by writes journalled and not yet settled


class ItemLedger:
    """The mirror of one collection's items (id -> generation) in a registry file; see the module docstring."""

    def __init__(self, registry: ModelRegistry, collection: str):
        self.registry, self.collection = registry, collection
        with closing(sqlite3.connect(registry.path, timeout=30.0)) as db:
            db.executescript(LEDGER_TABLES)
        with self.registry._transaction(write=True) as db:  # one process adds a missing column, the others see it
            _add_missing_columns(db)
        with closing(sqlite3.connect(registry.path, timeout=30.0)) as db:
            db.executescript(LEDGER_TRIGGERS)

    def counts(self) -> dict[int, int]:
        """Items per generation, as of the last settled write: one consistent read."""
        return self._per_generation("item_counts")

    def total(self) -> int:
        return sum(self.counts().values())

    def kept_counts(self) -> dict[int, int]:
        """Items per generation of their kept vector (items keeping none left out), as of the last settled write."""
        return self._per_generation("kept_counts")

    def _per_generation(self, table: Literal["item_counts", "kept_counts"]) -> dict[int, int]:
        with self.registry._transaction() as db:
            rows = db.execute(
                f"SELECT generation, items FROM {table} WHERE collection = ? AND items > 0 ORDER BY generation",
                (self.collection,),
            ).fetchall()
        return {int(g): int(n) for g, n in rows}

    def search_parts(self, active: int) -> SearchParts:
        """Which parts a merged search for ``active`` must run, from one short read of the counts.

        Counts read before the searches are safe to skip by because, while ``active`` is active, writes of it
        only move items into its current vectors (a backfill re-embeds or restores to the active generation, and
        new items are embedded by it): the items with a kept vector of it, and those with no vector of it, only
        become fewer. A write of another generation (a backfill still finishing after a rollback) could add to
        them, so while one is journalled and not settled, the part is searched anyway; so it is while kept
        generations are unknown (a ledger made before they were recorded, until it is rebuilt)."""
        with self.registry._transaction() as db:
            total, at_active, kept, unknown, other_writes = db.execute(
                "SELECT (SELECT COALESCE(SUM(items), 0) FROM item_counts WHERE collection = :c),"
                " (SELECT COALESCE(SUM(items), 0) FROM item_counts WHERE collection = :c AND generation = :g),"
                " (SELECT COALESCE(SUM(items), 0) FROM kept_counts WHERE collection = :c AND generation = :g),"
                " (SELECT COALESCE(SUM(items), 0) FROM kept_counts WHERE collection = :c AND generation = :u),"
                " (SELECT COUNT(*) FROM pending_writes WHERE collection = :c AND generation IS NOT :g)",
                {"c": self.collection, "g": int(active), "u": UNKNOWN_KEPT},
            ).fetchone()
        unsure = unknown > 0 or other_writes > 0
        return SearchParts(cross=unsure or total - at_active - kept > 0, kept=unsure or kept > 0)

    def last_reconciliation(self) -> Reconciliation | None:
        """The latest time the mirror was rebuilt or repaired from Milvus (``None``: never, a gallery not seen yet)."""
        with self.registry._transaction() as db:
            row = db.execute(
                "SELECT at, items, repaired, reason FROM reconciliations WHERE collection = ? ORDER BY at DESC LIMIT 1",
                (self.collection,),
            ).fetchone()
        return None if row is None else Reconciliation(*row)

    def begin(self, ids: Sequence[int], generation: int | None) -> int:
        """Journal a write of ``ids`` at ``generation`` (``None``: a delete) before it is sent to Milvus; the token
        settles it."""
        with self.registry._transaction(write=True) as db:
            cursor = db.execute(
                "INSERT INTO pending_writes (collection, ids, started_at, generation) VALUES (?, ?, ?, ?)",
                (self.collection, json.dumps([int(i) for i in ids]), time.time(), generation),
            )
            return int(cursor.lastrowid)

    def settle(self, token: int, states: dict[int, ItemState]) -> None:
        """The write landed: each item is now in its state, and the journal entry goes."""
        with self.registry._transaction(write=True) as db:
            self._set(db, states)
            db.execute("DELETE FROM pending_writes WHERE token = ?", (token,))

    def _set(self, db: sqlite3.Connection, states: dict[int, ItemState]) -> None:
        gone = [(self.collection, i) for i, state in states.items() if state is None]
        kept = [(self.collection, i, *state) for i, state in states.items() if state is not None]
        db.executemany("DELETE FROM items WHERE collection = ? AND id = ?", gone)
        db.executemany(
            "INSERT INTO items VALUES (?, ?, ?, ?) ON CONFLICT (collection, id) DO UPDATE SET "
            "generation = excluded.generation, previous_generation = excluded.previous_generation "
            "WHERE generation != excluded.generation OR previous_generation != excluded.previous_generation",
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
            found: dict[int, tuple[int, int]] = {}
            for start in range(0, len(ids), REPAIR_CHUNK):
                found.update(store.states_of(ids[start : start + REPAIR_CHUNK]))
            with self.registry._transaction(write=True) as db:
                if db.execute("SELECT 1 FROM pending_writes WHERE token = ?", (token,)).fetchone() is None:
                    continue
                self._set(db, {int(i): found.get(int(i)) for i in ids})
                db.execute("DELETE FROM pending_writes WHERE token = ?", (token,))
            repaired += len(ids)
        return repaired

    def rebuild(self, store: GalleryStore, reason: str) -> int:
        """The mirror replaced by what Milvus holds now (every id and its generations listed), recorded with
        ``reason``: a gallery seen for the first time, or an operator accepting what a damaged one still holds."""
        states = store.all_states()
        with self.registry._transaction(write=True) as db:
            db.execute("DELETE FROM items WHERE collection = ?", (self.collection,))
            db.execute("DELETE FROM item_counts WHERE collection = ?", (self.collection,))
            db.execute("DELETE FROM kept_counts WHERE collection = ?", (self.collection,))
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
    def writing(self, store: GalleryStore, generation: int | None, states: dict[int, ItemState]) -> Iterator[None]:
        """Journal, let the caller write to Milvus (at ``generation``, ``None`` for a delete), settle the items in
        ``states``. A write that raises stays journalled (it may or may not have landed) and is repaired at once
        where Milvus still answers, else when the gallery is next opened."""
        token = self.begin(list(states), generation)
        try:
            yield
        except BaseException:
            with suppress(Exception):  # Milvus failing: the entry stays journalled, for the next open to repair
                self.repair_pending(store)
            raise
        self.settle(token, states)

    def check(self, store: GalleryStore, by_generation: bool = False) -> None:
        """Refuse a gallery whose Milvus count differs from the mirror's beyond the writes in flight; repair the
        writes a crash interrupted (recorded). A gallery never seen with a mirror is taken as it is (recorded).

        A mirror whose kept generations are not known yet (made before they were recorded) is rebuilt once the
        total is found right.

        ``by_generation``: also compare the counts per generation, current and kept (one filtered count each, a
        scan of the whole collection in Milvus Lite: affordable once as a server starts, not on every CLI command)
        and rebuild the mirror where they differ with the total equal (no item lost: a write behind the registry's
        back, or an older state of the same items). Done on Milvus Lite only, which one process holds: on a server
        other writers may be mid-write and a listing would race them."""
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
        if UNKNOWN_KEPT in self.kept_counts():
            self.rebuild(store, "the mirror extended with each item's kept generation")
            return
        if by_generation and not is_server_uri(store.uri):
            real = {"current": store.generations(), "kept": store.generations("previous_generation")}
            mirrored = {"current": self.counts(), "kept": self.kept_counts()}
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

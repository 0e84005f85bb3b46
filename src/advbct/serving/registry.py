"""Model generations, the active one and the item-id counter: one SQLite file (WAL mode) beside the gallery.

Every process that touches a gallery (the server, its request threads, CLI commands, backfill workers) reads and
writes this state through short transactions on the same file and keeps no copy of it, so no writer can
overwrite what another wrote: a CLI rollback is seen by a running server at its next request, and ids reserved by
concurrent requests never overlap (``BEGIN IMMEDIATE`` takes the write lock before the counter is read). The
vectors live in Milvus; this file only names checkpoints and decisions.
"""

from __future__ import annotations

import getpass
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from advbct.data.images import DataError, ImageSet, load_image_folder
from advbct.serving.gate import GatePolicy, GateRefused, GateResult, compatibility_gate, describe_gate
from advbct.serving.models import Embedder
from advbct.serving.store import MixedMerge

SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    number INTEGER PRIMARY KEY, path TEXT NOT NULL, model_id TEXT NOT NULL UNIQUE, dim INTEGER NOT NULL,
    image_size INTEGER NOT NULL, registered_at REAL NOT NULL, gate TEXT
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Generation:
    number: int
    path: str
    model_id: str
    dim: int
    image_size: int
    registered_at: float
    gate: GateResult | None

    def gate_json(self) -> dict | None:
        """The gate as the registry stores it; None for the first generation, which no gate judged."""
        return None if self.gate is None else self.gate.to_json()

    def to_json(self) -> dict:
        """The generation as the API lists it."""
        return {**self.__dict__, "gate": self.gate_json()}

    def mixed_merge(self) -> MixedMerge:
        """How searches run while this generation is active: through its own vectors where an item has one
        (current or kept), ranked by the score calibration its gate fitted (its own items against the previous
        generation's), or by plain cosine where it has none (the first generation)."""
        calibration = None if self.gate is None else self.gate.calibration
        return MixedMerge(self.number) if calibration is None else MixedMerge.from_calibration(self.number, calibration)


def _generation(row: tuple) -> Generation:
    number, path, model_id, dim, image_size, registered_at, gate = row
    result = GateResult.from_json(json.loads(gate)) if gate else None
    return Generation(number, path, model_id, dim, image_size, registered_at, result)


class ModelRegistry:
    """Generations and the active one, in the SQLite file ``path``; every call reads the file afresh."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not _is_sqlite(self.path):
            raise DataError(f"{self.path} is not a model registry (an SQLite file)")
        with closing(sqlite3.connect(self.path, timeout=30.0)) as db:
            db.execute("PRAGMA journal_mode=WAL")  # kept by the file: readers never wait for a writer
            db.executescript(SCHEMA)

    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30.0, isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @staticmethod
    def _setting(db: sqlite3.Connection, key: str) -> int | None:
        row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _set(db: sqlite3.Connection, key: str, value: int) -> None:
        db.execute("INSERT INTO settings VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                   (key, value))  # fmt: skip

    @property
    def generations(self) -> list[Generation]:
        with self._transaction() as db:
            return [_generation(r) for r in db.execute("SELECT * FROM generations ORDER BY number")]

    @property
    def active_number(self) -> int | None:
        """The active generation's number alone: what a server checks on every request."""
        with self._transaction() as db:
            return self._setting(db, "active")

    @property
    def active(self) -> Generation | None:
        """The generation that serves queries (``None`` before the first is registered)."""
        with self._transaction() as db:
            number = self._setting(db, "active")
            row = db.execute("SELECT * FROM generations WHERE number = ?", (number,)).fetchone()
        return None if row is None else _generation(row)

    def generation(self, number: int) -> Generation:
        """Generation ``number``; refused where it is not registered."""
        found = next((g for g in self.generations if g.number == number), None)
        if found is None:
            raise GateRefused(f"no generation {number} is registered")
        return found

    def _append(self, embedder: Embedder, gate: GateResult | None, first: bool = False) -> Generation:
        with self._transaction(write=True) as db:
            if first and db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]:
                raise GateRefused("the registry already has generations; use upgrade")
            number = db.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM generations").fetchone()[0]
            entry = Generation(number, str(embedder.path.resolve()), embedder.meta.model_id, embedder.dim,
                               embedder.prep.image_size, time.time(), gate)  # fmt: skip
            stored_gate = None if gate is None else json.dumps(gate.to_json())
            try:
                db.execute("INSERT INTO generations VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (*list(entry.__dict__.values())[:-1], stored_gate))  # fmt: skip
            except sqlite3.IntegrityError:
                raise GateRefused(f"{embedder.path} is already registered") from None
            self._set(db, "active", number)
        return entry

    def register_first(self, path: str | Path, device: str = "cpu") -> Generation:
        """Register the checkpoint that starts the gallery, active at once: with nothing to be compatible with,
        there is no gate."""
        return self._append(Embedder(path, device), None, first=True)

    def upgrade(
        self,
        path: str | Path,
        validation: str | Path | ImageSet,
        device: str = "cpu",
        force: bool = False,
        reason: str | None = None,
        policy: GatePolicy | None = None,
    ) -> Generation:
        """Gate the candidate against the active generation; make it active only if it passes.

        ``validation``: a labelled image folder, or images already decoded (a run's validation split); ``policy``:
        the gate's minimum validation size and bootstrap (``GatePolicy()`` by default).
        ``force`` is the operator's override and needs a ``reason``: the gate still runs, and its numbers are
        recorded with the generation, with who forced it and why. It also overrides a validation set too small
        to decide on (the operator vouches for the model, the record says the gate could not).
        A checkpoint registered before (rolled back since) is gated again and, passing, made active under its
        own number: a roll-forward, with every item it embedded still its own.
        """
        if force and not (reason or "").strip():
            raise DataError("forcing a model past the compatibility gate needs a reason (--reason TEXT)")
        candidate = Embedder(path, device)
        result = self._gate(candidate, validation, policy)
        if not result.passed and not force:
            where = validation if not isinstance(validation, ImageSet) else "the validation split"
            verb = "fails the compatibility gate" if result.decided else "cannot be gated"
            raise GateRefused(f"{path} {verb} on {where}: {describe_gate(result)}")
        forced = force and not result.passed
        result = replace(result, forced=forced)
        if forced:
            result = replace(result, forced_by=getpass.getuser(), reason=reason)
        registered = next((g for g in self.generations if g.model_id == candidate.meta.model_id), None)
        if registered is not None:
            return self._activate(registered)
        return self._append(candidate, result)

    def _activate(self, generation: Generation) -> Generation:
        with self._transaction(write=True) as db:
            self._set(db, "active", generation.number)
        return generation

    def check_gate(
        self,
        path: str | Path,
        validation: str | Path | ImageSet,
        device: str = "cpu",
        policy: GatePolicy | None = None,
    ) -> GateResult:
        """The gate's numbers for a candidate against the active generation; registers nothing."""
        return self._gate(Embedder(path, device), validation, policy)

    def _gate(self, candidate: Embedder, validation: str | Path | ImageSet, policy: GatePolicy | None) -> GateResult:
        current = self.active
        if current is None:
            raise GateRefused("no active generation to upgrade from; register the first model")
        if candidate.meta.model_id == current.model_id:
            raise GateRefused(f"{candidate.path} is the active generation ({current.number}) already")
        old = Embedder(current.path, str(candidate.device))
        if not isinstance(validation, ImageSet):
            validation = load_image_folder(validation, old.prep.image_size)
        return compatibility_gate(old, candidate, validation, policy)

    def reserve_ids(self, count: int) -> int:
        """The first of ``count`` fresh item ids, committed before any item is written."""
        with self._transaction(write=True) as db:
            start = self._setting(db, "next_id") or 0
            self._set(db, "next_id", start + count)
        return start

    def rollback(self) -> Generation:
        """Make the generation before the active one active again."""
        with self._transaction(write=True) as db:
            active = self._setting(db, "active")
            row = db.execute("SELECT * FROM generations WHERE number < ? ORDER BY number DESC LIMIT 1",
                             (active if active is not None else 0,)).fetchone()  # fmt: skip
            if row is None:
                raise GateRefused("there is no earlier generation to roll back to")
            self._set(db, "active", row[0])
        return _generation(row)


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(16) == b"SQLite format 3\x00" or path.stat().st_size == 0

"""Which gallery items recent searches returned: the input of the ``traffic`` backfill order.

The service records the top hits of each search in a ring buffer (the last ``window`` searches, ``depth`` hits
each): a bounded window that forgets old traffic by itself, costs one row write per search, and is counted in one
vectorised pass when a backfill starts. The buffer is saved in the registry's SQLite file (at each backfill start
and at shutdown) and read back when a server starts, so a restarted server continues the same window and a CLI
backfill on the same registry orders by the traffic the server saw.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from contextlib import closing

import numpy as np

from advbct.serving.registry import ModelRegistry

TRAFFIC_SCHEMA = """
CREATE TABLE IF NOT EXISTS search_traffic (
    collection TEXT PRIMARY KEY, searches INTEGER NOT NULL, depth INTEGER NOT NULL, position INTEGER NOT NULL,
    hits BLOB NOT NULL, saved_at REAL NOT NULL
);
"""

WINDOW = 10_000  # searches remembered
DEPTH = 10  # hits per search counted (a search's top 10)


class SearchTraffic:
    """The hit ids of the last ``window`` searches, ``depth`` per search (``-1`` pads a search with fewer hits)."""

    def __init__(self, window: int = WINDOW, depth: int = DEPTH):
        if window < 1 or depth < 1:
            raise ValueError(f"a traffic window needs at least one search and one hit, got {window} x {depth}")
        self.hits = np.full((window, depth), -1, dtype=np.int64)
        self.position = 0  # searches recorded so far; the next one goes to row position % window
        self.lock = threading.Lock()

    def record(self, ids: Sequence[int]) -> None:
        """One search's hits, best first (those past ``depth`` are not counted)."""
        row = np.full(self.hits.shape[1], -1, dtype=np.int64)
        top = np.asarray(ids[: self.hits.shape[1]], dtype=np.int64)
        row[: top.shape[0]] = top
        with self.lock:
            self.hits[self.position % self.hits.shape[0]] = row
            self.position += 1

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, times returned) over the window, ids ascending."""
        with self.lock:
            seen = self.hits[self.hits >= 0]
        return np.unique(seen, return_counts=True)

    def save(self, registry: ModelRegistry, collection: str) -> None:
        """Save the window for ``collection`` in the registry's file, replacing the one saved before."""
        with self.lock:
            blob, position = self.hits.tobytes(), self.position
        with registry._transaction(write=True) as db:
            db.execute(
                "INSERT INTO search_traffic VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (collection) DO UPDATE SET "
                "searches = excluded.searches, depth = excluded.depth, position = excluded.position, "
                "hits = excluded.hits, saved_at = excluded.saved_at",
                (collection, self.hits.shape[0], self.hits.shape[1], position, blob, time.time()),
            )

    @classmethod
    def load(cls, registry: ModelRegistry, collection: str, window: int = WINDOW, depth: int = DEPTH) -> SearchTraffic:
        """The window saved for ``collection``, or an empty one. A window saved with another shape is not resized:
        its rows are copied newest first into the new one, as far as they fit."""
        with closing(sqlite3.connect(registry.path, timeout=30.0)) as db:
            db.executescript(TRAFFIC_SCHEMA)
        traffic = cls(window, depth)
        with registry._transaction() as db:
            row = db.execute(
                "SELECT searches, depth, position, hits FROM search_traffic WHERE collection = ?", (collection,)
            ).fetchone()
        if row is None:
            return traffic
        searches, saved_depth, position, blob = row
        saved = np.frombuffer(blob, dtype=np.int64).reshape(searches, saved_depth)
        newest_first = saved[(position - 1 - np.arange(min(position, searches))) % searches]
        kept = newest_first[:window, :depth][::-1]
        traffic.hits[: kept.shape[0], : kept.shape[1]] = kept
        traffic.position = kept.shape[0]
        return traffic


def traffic_order(stale_ids: np.ndarray, hit_ids: np.ndarray, hit_counts: np.ndarray) -> np.ndarray:
    """``stale_ids`` (in storage order) most-returned first; ties and items never returned keep storage order."""
    found = np.searchsorted(hit_ids, stale_ids)
    found = np.minimum(found, max(hit_ids.shape[0] - 1, 0))
    counts = np.zeros(stale_ids.shape[0], dtype=np.int64)
    if hit_ids.shape[0]:
        matched = hit_ids[found] == stale_ids
        counts[matched] = hit_counts[found[matched]]
    return stale_ids[np.argsort(-counts, kind="stable")]
